"""The read API's routes, one small module per resource."""
