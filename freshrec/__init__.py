"""freshrec for its callers: the Python client (`freshrec.client`)."""
