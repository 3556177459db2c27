"""From user input to validated token ids: tokenizer loading, chat rendering, limits."""
