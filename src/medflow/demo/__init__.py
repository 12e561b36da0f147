"""The synthetic demo cohort (`medflow synth`). A leaf: nothing in the product imports it."""
