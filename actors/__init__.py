"""Ray actors of Flow-OPD: teacher servers, rollout workers, the DDP learner group, and the step loop."""
