"""Where curves and numbers go besides the run dir: TensorBoard as written here, MLflow."""
