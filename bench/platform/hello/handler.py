def handle(req):
    return "hello " + req
