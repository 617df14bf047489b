"""Build No-Human datasets: segment people, remove them from the video, audit the result."""
