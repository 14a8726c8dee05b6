"""Listeners: where the app's calls enter the data path."""
