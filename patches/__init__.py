"""Version-guarded fixes to upstream libraries (installed as `selfee_plugin.patches`); see README.md here."""
