"""Online RL trainers (GRPO, RLOO): the ``num_generations`` completions of a prompt scored with the prompt run once."""
