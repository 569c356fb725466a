"""What can be searched: parameter kinds (kinds.py, YAML syntax in syntax.py), the parameters of each
PEFT method with published defaults (methods.py), and target-module presets per architecture
(targets.py). Nothing heavy is imported here: Optuna and torch load only where they are used."""
