"""The one-machine text-to-image world of the demo and tests, kept apart from the method in flowopd/."""
