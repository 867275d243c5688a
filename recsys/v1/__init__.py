"""recsys.v1: generated messages and stubs; run `make proto` to create them."""
