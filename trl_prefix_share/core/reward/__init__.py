"""Reward models: TRL's padded reward batch plus its packed layout and read-out positions (`collator`), and the packed
forward of sequence-classification models with its probe (`scores`)."""
