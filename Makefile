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
TEST_DEBS    = $(RUNTIME_DEBS) python3-venv ceph-mon ceph-mgr ceph-osd xenstore-utils qemu-utils util-linux kmod python3-hypothesis
XEN_DEBS     = qemu-system-x86 iproute2 cpio busybox-static e2fsprogs zstd python3-pytest python3-pytest-mock
# The other stacks come from cached Debian roots (tools/debianroot.py).
STACK_DEBS   = debootstrap debian-archive-keyring

# `make deb`: Debian's own packaging tools, and lintian to check the result.
DEB_DEBS     = debhelper dh-python python3-all python3-setuptools python3-click python3-yaml dpkg-dev lintian
VERSION      := $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' block_rbd/__init__.py)
DEB          = dist/block-rbd_$(VERSION)_all.deb

# The package and every sub-package (a directory with an __init__.py).
PACKAGES     = $(patsubst %/,%,$(dir $(wildcard block_rbd/__init__.py block_rbd/*/__init__.py)))

.PHONY: help deps deb-deps deb deb-locked venv install uninstall demo test test-host test-ceph18 test-debian13 test-unit test-xen test-xen-core xen-boot-sets bench clean

help:
	@echo "make demo      run the main job end to end on a throwaway local Ceph cluster"
	@echo "make test      install what the tests need, then run the whole suite"
	@echo "make test-xen  only the Xen-in-QEMU release gate, as CI runs it (BLOCK_RBD_XEN_MATRIX=full: every pairing)"
	@echo "make test-xen-core  the gate without the debian12-ceph18 systemd run (CI's less 11 min)"
	@echo "make test-ceph18 / test-debian13  the host-side suite against Ceph 18.2 / inside Debian 13"
	@echo "make deb       build dist/block-rbd_VERSION_all.deb (Debian 12 and 13) and lint it"
	@echo "make install   install the package and /etc/xen/scripts/block-rbd (dom0)"
	@echo "make bench     run the benchmarks under benchmarks/"

# Installs only what is missing, so a second run costs no apt round trip.
deps:
	@missing=$$(for p in $(TEST_DEBS) $(XEN_DEBS) $(STACK_DEBS) $(DEB_DEBS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

deb-deps:
	@missing=$$(for p in $(DEB_DEBS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# Built from a copy of the tracked (and new, unignored) files, so the tree stays clean;
# lintian fails the build on any error.  One build at a time: the package test and the
# gates' boot sets both run `make deb`, side by side under `make test`.
deb: deb-deps
	@mkdir -p build && flock build/deb.lock $(MAKE) --no-print-directory deb-locked

deb-locked:
	rm -rf build/deb && mkdir -p build/deb/block-rbd-$(VERSION) dist
	git ls-files -z -co --exclude-standard | tar --null -T - -cf - | tar -xf - -C build/deb/block-rbd-$(VERSION)
	cd build/deb/block-rbd-$(VERSION) && dpkg-buildpackage -us -uc -b --no-sign >../build.log 2>&1 \
		|| { tail -30 ../build.log; exit 1; }
	lintian --fail-on error,warning --info build/deb/block-rbd_$(VERSION)_all.deb
	cp build/deb/block-rbd_$(VERSION)_all.deb $(DEB).new && mv -f $(DEB).new $(DEB)  # readers never see half
	@echo "built $(DEB)"

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
	install -d $(DESTDIR)$(UNITDIR)/xendomains.service.d
	install -m 0644 etc/systemd/xendomains.service.d/block-rbd.conf $(DESTDIR)$(UNITDIR)/xendomains.service.d/
	@echo "systemd dom0: systemctl daemon-reload && systemctl enable --now block-rbd.socket block-rbd-release-pending.timer block-rbd-release-pending.service block-rbd-upkeep.service"

uninstall:
	rm -rf $(DESTDIR)$(PYLIBDIR)/block_rbd $(DESTDIR)$(SCRIPTDIR)/block-rbd $(DESTDIR)/usr/local/sbin/block-rbd
	rm -f $(addprefix $(DESTDIR)$(UNITDIR)/,$(notdir $(wildcard etc/systemd/*.*))) $(DESTDIR)$(UNITDIR)/xendomains.service.d/block-rbd.conf

demo: deps
	$(PYTHON) tools/demo.py

# The host-side suite on its three stacks side by side (each its own cluster and temp dirs;
# measured: each keeps less than one CPU busy) and the gates' boot sets, then the Xen gates
# of every pairing alone: a TCG machine shares its CPUs badly (QoS rates in dom0 fell below
# their limits beside them).  Every part runs, and any failure fails the target.
test: deps venv
	@rc=0; \
	$(MAKE) --no-print-directory -k -j4 --output-sync=target test-host test-ceph18 test-debian13 xen-boot-sets \
		|| rc=1; \
	$(MAKE) --no-print-directory test-xen || rc=1; \
	exit $$rc

# This system (Debian 12: Python 3.11, Ceph 16.2 clients and cluster) and the package.
test-host: deps venv
	$(VENV)/bin/python -m pytest tests/unit tests/integration tests/package tests/fuzz

# This system's clients against a Ceph 18.2 cluster (Debian 13's daemons, from a cached root):
# a cluster upgraded before its dom0s.
test-ceph18: deps venv
	BLOCK_RBD_TEST_CLUSTER_SUITE=trixie $(VENV)/bin/python -m pytest -p no:cacheprovider \
		--basetemp=/tmp/brbd-ceph18 tests/unit tests/integration

# The host-side suite inside a Debian 13 root: Python 3.13, Ceph 18.2 bindings, tools and
# cluster, rbd-fuse with libfuse 3.17.  The root stays as built (changes go to an overlay).
test-debian13: deps
	@ov=$$(mktemp -d /tmp/brbd-debian13.XXXXXX); \
	$(PYTHON) tools/debianroot.py run --suite trixie --bind $(CURDIR) --overlay $$ov --cwd $(CURDIR) -- \
		python3 -m pytest -p no:cacheprovider --basetemp=/tmp/brbd-debian13 tests/unit tests/integration; \
	rc=$$?; rm -rf $$ov; exit $$rc

test-unit: venv
	$(VENV)/bin/python -m pytest tests/unit

# Both dom0 stacks' boot sets and the systemd gate's disk images, cached by their inputs
# (the gates reuse them): from a cold cache about 2 min of downloads, unpacking and packing
# (measured 19 s + 95 s), and for the images about 3 min (roots 79 s + 57 s, images
# 27 s + 14 s), which `make test` takes off the gates' critical path.
xen-boot-sets: deps
	$(PYTHON) tests/xen/build_dom0.py --stack debian12
	$(PYTHON) tests/xen/build_dom0.py --stack debian13
	$(PYTHON) tests/xen/sysdom0.py build --stack debian12 >/dev/null
	$(PYTHON) tests/xen/sysdom0.py build --stack debian13 >/dev/null

test-xen: deps venv
	$(VENV)/bin/python -m pytest tests/xen

test-xen-core: deps venv
	BLOCK_RBD_XEN_MATRIX=core $(VENV)/bin/python -m pytest tests/xen

bench: deps venv
	$(VENV)/bin/python benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
