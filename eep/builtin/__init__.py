"""Built-in assets: the character tokenizer and the tiny MoE trained on the synthetic tasks."""
