"""Feature stage: item JSONL -> view prompts -> CLIP towers -> similarity and fusion -> files."""
