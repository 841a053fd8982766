"""Data shipped with vhack: contrastive (prompt, hack, clean) pair sets as JSONL."""
