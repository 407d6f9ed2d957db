"""Serving: a Ray Serve application that generates images with the student and any teacher adapter."""
