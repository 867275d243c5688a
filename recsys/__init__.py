"""Generated protocol buffers and gRPC stubs (`make proto`)."""
