"""io: everything that touches the outside world before conversion: user checkpoints, factories, images, atomic files.
May import: errors and version only (the bottom stage)."""
