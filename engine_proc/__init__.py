"""Engine processes: the step loop and the model backends (llama_cpp, fake)."""
