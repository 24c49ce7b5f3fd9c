"""``sharpen eval``: what each strategy buys, measured on datasets with known answers."""
