"""The operators' console: `/ops` (HTML for people) and `/api/v1/ops/` (the same data as JSON)."""
