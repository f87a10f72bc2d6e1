"""Built-in tasks: prompts, demonstrations and held-out splits with a scripted labeler."""
