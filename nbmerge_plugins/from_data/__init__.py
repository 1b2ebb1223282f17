"""Methods that merge from statistics of each fine-tune on its own task's inputs, in closed form: RegMean,
RegMean++ (inputs' Gram matrices) and Fisher merging (diagonal Fisher information). ``_data_pass`` draws the
inputs and runs the statistic; ``_static_build`` and ``_regmean_solve`` hold the steps they share."""
