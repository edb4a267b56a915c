"""eep: prune and merge MoE experts."""
