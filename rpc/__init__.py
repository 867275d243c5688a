"""gRPC plumbing shared by the two services: the error table, server setup, health."""
