"""Model behaviour tests on a small trained model (invariances, directional expectations)."""
