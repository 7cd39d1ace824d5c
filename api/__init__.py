"""The read API the agents' web app talks to: sessions, notifications, conversations, replies,
health and metrics. It may import `schemas` and `infra`, never another edge."""
