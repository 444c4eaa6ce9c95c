.PHONY: demo test check
demo:
	scripts/demo
test:
	scripts/test
check:
	scripts/check
