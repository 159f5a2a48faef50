"""Online DPO trainer that scores samples with a reward model served over HTTP."""
