"""`kubetune ...`: one explicit command table over library functions."""
