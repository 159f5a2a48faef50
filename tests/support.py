"""Constants shared by tests."""

# The metric names TRL 1.16's OnlineDPOTrainer logs with a reward model (the issue's list).
TRL_METRIC_NAMES = frozenset(
    {
        "objective/kl",
        "objective/entropy",
        "objective/non_score_reward",
        "objective/rlhf_reward",
        "objective/scores",
        "objective/scores_margin",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "val/contain_eos_token",
        "beta",
    }
)
TIMING_NAMES = frozenset({"time/generate", "time/score_wait", "time/forward_backward"})
