# frame-cache
