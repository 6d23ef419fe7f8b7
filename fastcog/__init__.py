"""fastcog: fast CogVideoX fine-tuning."""
__version__ = "0.1.0"
