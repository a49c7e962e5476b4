"""One module per method, each registering its class with `@METHODS.register` (evalkit/sampling/method.py); the
registry imports every module here the first time a method is looked up."""
