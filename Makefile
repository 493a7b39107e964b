# block-rbd: build, install, test.  Targets that install packages need root.

PYTHON      ?= /usr/bin/python3
VENV        ?= .venv
DESTDIR     ?=
SCRIPTDIR   ?= /etc/xen/scripts
CONFDIR     ?= /etc/xen
UNITDIR     ?= /etc/systemd/system
# Debian's python3 looks here for locally installed packages.
PYLIBDIR    ?= $(shell $(PYTHON) -c 'import sys; print("/usr/local/lib/python%d.%d/dist-packages" % sys.version_info[:2])')

# Runtime: what dom0 needs.  Test: a real local Ceph cluster, the xenstore
# tools, rbd-fuse/rbd-nbd, qemu-img.  Xen: what the Xen-in-QEMU harness builds from.
RUNTIME_DEBS = python3 python3-rados python3-rbd python3-click python3-yaml ceph-common fuse rbd-fuse rbd-nbd
TEST_DEBS    = $(RUNTIME_DEBS) python3-venv ceph-mon ceph-mgr ceph-osd xenstore-utils qemu-utils util-linux kmod
XEN_DEBS     = qemu-system-x86 iproute2 cpio busybox-static e2fsprogs python3-pytest python3-pytest-mock

# The package and every sub-package (a directory with an __init__.py).
PACKAGES     = $(patsubst %/,%,$(dir $(wildcard block_rbd/__init__.py block_rbd/*/__init__.py)))

.PHONY: help deps venv install uninstall demo test test-unit test-xen bench clean

help:
	@echo "make demo      run the main job end to end on a throwaway local Ceph cluster"
	@echo "make test      install what the tests need, then run the whole suite"
	@echo "make test-xen  only the Xen-in-QEMU release gate"
	@echo "make install   install the package and /etc/xen/scripts/block-rbd (dom0)"
	@echo "make bench     run the benchmarks under benchmarks/"

# Installs only what is missing, so a second run costs no apt round trip.
deps:
	@missing=$$(for p in $(TEST_DEBS) $(XEN_DEBS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# --system-site-packages: Ceph's rados/rbd bindings exist only as Debian packages.
$(VENV)/.ready: setup.cfg setup.py
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check pytest pytest-mock
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

venv: $(VENV)/.ready

# The old tree goes first: a module that became a package (backup.py, cli.py) must not linger.
install:
	rm -rf $(DESTDIR)$(PYLIBDIR)/block_rbd
	for pkg in $(PACKAGES); do \
		install -d $(DESTDIR)$(PYLIBDIR)/$$pkg && install -m 0644 $$pkg/*.py $(DESTDIR)$(PYLIBDIR)/$$pkg/ || exit 1; \
	done
	install -d $(DESTDIR)$(SCRIPTDIR)
	install -m 0755 scripts/block-rbd $(DESTDIR)$(SCRIPTDIR)/block-rbd
	install -d $(DESTDIR)/usr/local/sbin
	ln -sf $(SCRIPTDIR)/block-rbd $(DESTDIR)/usr/local/sbin/block-rbd
	[ -e $(DESTDIR)$(CONFDIR)/block-rbd.yaml ] || install -m 0644 etc/block-rbd.yaml $(DESTDIR)$(CONFDIR)/block-rbd.yaml
	install -d $(DESTDIR)$(UNITDIR)
	install -m 0644 etc/systemd/*.socket etc/systemd/*.service etc/systemd/*.timer $(DESTDIR)$(UNITDIR)/
	@echo "systemd dom0: systemctl daemon-reload && systemctl enable --now block-rbd.socket block-rbd-release-pending.timer block-rbd-upkeep.service"

uninstall:
	rm -rf $(DESTDIR)$(PYLIBDIR)/block_rbd $(DESTDIR)$(SCRIPTDIR)/block-rbd $(DESTDIR)/usr/local/sbin/block-rbd
	rm -f $(addprefix $(DESTDIR)$(UNITDIR)/,$(notdir $(wildcard etc/systemd/*)))

demo: deps
	$(PYTHON) tools/demo.py

test: deps venv
	$(VENV)/bin/python -m pytest tests

test-unit: venv
	$(VENV)/bin/python -m pytest tests/unit

test-xen: deps venv
	$(VENV)/bin/python -m pytest tests/xen

bench: deps venv
	$(VENV)/bin/python benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
