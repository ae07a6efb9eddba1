"""What the tests share: checkpoint and folder builders (fixtures, paper_fixtures) and the
CLI runners (cli)."""
