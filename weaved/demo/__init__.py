"""Three small HTTP services (users, auth, tasks) that call each other: traffic for a weaved lab."""
