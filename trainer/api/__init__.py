"""The spec and its errors: pure definitions every other part of kubetune imports."""
