"""The ranking service: top items for a user from their latest vector, filtered and ranked."""
