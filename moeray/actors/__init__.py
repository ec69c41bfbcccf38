"""Ray actors of the moeray service (the next issue builds them)."""
