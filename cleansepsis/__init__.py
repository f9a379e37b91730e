"""cleansepsis: offline RL for sepsis treatment. Research use only."""
