"""train: fine-tuning, distillation and evaluation of converted models, and their training snapshots.
May import: io, dynamics, budget, dynfile (never deploy)."""
