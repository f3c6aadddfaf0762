"""Array operations on images and maps: CTF, projection, backprojection, filters."""
