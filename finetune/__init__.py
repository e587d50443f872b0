"""FoT crossbatch fine-tuning."""
