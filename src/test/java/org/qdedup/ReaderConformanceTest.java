package org.qdedup;

import static org.assertj.core.api.Assertions.assertThat;
import static org.assertj.core.api.Assertions.fail;
import static org.junit.jupiter.api.DynamicContainer.dynamicContainer;
import static org.junit.jupiter.api.DynamicTest.dynamicTest;

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.PrintStream;
import java.io.RandomAccessFile;
import java.math.BigDecimal;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Collections;
import java.util.List;
import java.util.Map;
import java.util.Random;
import java.util.function.Predicate;
import java.util.stream.Stream;
import org.junit.jupiter.api.DynamicNode;
import org.junit.jupiter.api.TestFactory;
import org.junit.jupiter.api.io.TempDir;

/**
 * Reader conformance against QEMU 7.2: builds many qcow2/raw variants with qemu-img/qemu-io at run time and checks
 * that qdedup's {@code convert -O raw}, {@code map --output=json}, {@code info --output=json}, {@code compare} and
 * {@code snapshot -l} agree with qemu-img's on each of them.
 *
 * <p>Every qemu-img command runs in the JVM's working directory and gets exactly the path strings qdedup gets, so
 * "filename" and "full-backing-filename" are comparable (one variant deliberately uses a relative path).
 */
class ReaderConformanceTest {
    static final long SEED = 0x0DDC0FFEEL;
    static final long MiB = 1024 * 1024;

    @TempDir
    static Path root;

    // ------------------------------------------------------------------------------------------------ running ours

    record Run(int exit, String out, String err) {
    }

    /** Runs qdedup's CLI in-process. */
    static Run ours(String... args) {
        ByteArrayOutputStream o = new ByteArrayOutputStream();
        ByteArrayOutputStream e = new ByteArrayOutputStream();
        int rc;
        try (PrintStream po = new PrintStream(o, true, StandardCharsets.UTF_8);
                PrintStream pe = new PrintStream(e, true, StandardCharsets.UTF_8)) {
            rc = org.qdedup.cli.Main.run(args, po, pe);
        }
        return new Run(rc, o.toString(StandardCharsets.UTF_8), e.toString(StandardCharsets.UTF_8));
    }

    static Run oursOk(String... args) {
        Run r = ours(args);
        if (r.exit() != 0) {
            fail("qdedup %s exited %d%nstderr: %s%nstdout: %s", String.join(" ", args), r.exit(), r.err(), r.out());
        }
        return r;
    }

    // ------------------------------------------------------------------------------------------------ variants

    /** What qemu says about a built image, for the feature checks. */
    record Facts(Map<String, Object> info, Map<String, Object> check, List<Map<String, Object>> map, String snapshots) {
        Object fs(String key) {
            return Json.at(info, "format-specific", "data", key);
        }

        long num(Object v) {
            assertThat(v).as("a number").isInstanceOf(BigDecimal.class);
            return ((BigDecimal) v).longValueExact();
        }

        long infoNum(String key) {
            return num(info.get(key));
        }

        boolean anyExtent(Predicate<Map<String, Object>> p) {
            return map.stream().anyMatch(p);
        }

        long maxDepth() {
            return map.stream().mapToLong(m -> num(m.get("depth"))).max().orElse(-1);
        }

        long clusterSize() {
            return infoNum("cluster-size");
        }
    }

    interface Builder {
        String build(Ctx c) throws Exception;
    }

    interface Features {
        void check(Facts f);
    }

    /**
     * One image variant: {@code build} makes it and returns the path string to give both tools; {@code snapshots}
     * lists the internal snapshots to convert; {@code chain} asks for an {@code info --backing-chain} comparison.
     */
    record Variant(String name, List<String> snapshots, boolean chain, Builder build, Features features) {
        @Override
        public String toString() {
            return name;
        }
    }

    static Variant v(String name, Builder b, Features f) {
        return new Variant(name, List.of(), false, b, f);
    }

    static Variant chain(String name, Builder b, Features f) {
        return new Variant(name, List.of(), true, b, f);
    }

    static Variant snaps(String name, List<String> snapshots, Builder b, Features f) {
        return new Variant(name, snapshots, false, b, f);
    }

    /** Helpers for building one variant in its own directory with its own seeded Random. */
    static final class Ctx {
        final Path dir;
        final Random rnd;
        private int patternFiles;

        Ctx(Path dir, long seed) {
            this.dir = dir;
            this.rnd = new Random(seed);
        }

        String path(String rel) {
            return dir.resolve(rel).toString();
        }

        /** qemu-img create -f qcow2 [-o OPTS] FILE SIZE; returns the path. */
        String qcow2(String file, long size, String opts) {
            List<String> a = new ArrayList<>(List.of("create", "-q", "-f", "qcow2"));
            if (opts != null && !opts.isEmpty()) {
                a.add("-o");
                a.add(opts);
            }
            a.add(path(file));
            a.add(Long.toString(size));
            Qemu.img(null, a.toArray(String[]::new));
            return path(file);
        }

        /** qemu-img create -f qcow2 -b BACKING -F FMT [-o OPTS] FILE [SIZE]; BACKING is stored as given. */
        String overlay(String file, String backing, String backingFmt, long size, String opts) {
            List<String> a = new ArrayList<>(List.of("create", "-q", "-f", "qcow2", "-b", backing, "-F", backingFmt));
            if (opts != null && !opts.isEmpty()) {
                a.add("-o");
                a.add(opts);
            }
            a.add(path(file));
            if (size > 0) {
                a.add(Long.toString(size));
            }
            Qemu.img(null, a.toArray(String[]::new));
            return path(file);
        }

        /** A sparse raw file of exactly {@code size} bytes (not necessarily a multiple of 512). */
        String raw(String file, long size) throws IOException {
            Files.createDirectories(dir.resolve(file).getParent());
            try (RandomAccessFile f = new RandomAccessFile(path(file), "rw")) {
                f.setLength(size);
            }
            return path(file);
        }

        void io(String img, String fmt, List<String> cmds) {
            Qemu.io(null, fmt, img, cmds);
        }

        /** A file of n bytes (random, or random then zeros), for {@code write -s}: qemu-io repeats it. */
        String patternFile(int n, boolean halfZero) throws IOException {
            byte[] b = new byte[n];
            rnd.nextBytes(b);
            if (halfZero) {
                Arrays.fill(b, n / 2, n, (byte) 0);
            }
            Path p = dir.resolve("pattern" + (patternFiles++) + ".bin");
            Files.write(p, b);
            return p.toString();
        }

        int pattern() {
            return 1 + rnd.nextInt(255);
        }

        /** [off, len] within size; kind 0 cluster-aligned, 1 sector-aligned (4096k+512j), 2 byte-unaligned. */
        long[] range(long size, int cluster, int kind) {
            long off;
            long len;
            switch (kind) {
                case 0 -> {
                    off = (long) cluster * rnd.nextLong(Math.max(1, size / cluster));
                    len = (long) cluster * (1 + rnd.nextInt(3));
                }
                case 1 -> {
                    off = 4096L * rnd.nextLong(Math.max(1, size / 4096)) + 512L * rnd.nextInt(8);
                    len = 512L * (1 + rnd.nextInt(40));
                }
                default -> {
                    off = rnd.nextLong(size);
                    len = 1 + rnd.nextInt(Math.max(10000, 2 * cluster));
                }
            }
            off = Math.min(off, size - 1);
            len = Math.max(1, Math.min(len, size - off));
            return new long[] {off, len};
        }

        /**
         * A seeded mix of n operations: the first half pattern writes, then writes, zero writes (with and without
         * unmap) and discards, over aligned, sector-aligned and byte-unaligned ranges; then one of each kind.
         */
        List<String> workload(long size, int cluster, int n) {
            List<String> c = new ArrayList<>();
            for (int k = 0; k < n; k++) {
                long[] r = range(size, cluster, k % 3);
                int op = k < n / 2 ? 0 : rnd.nextInt(6);
                c.add(op(op, r));
            }
            for (int op = 0; op < 6; op++) {
                c.add(op(op, range(size, cluster, op % 3)));
            }
            c.add(op(3, range(size, cluster, 0)));
            c.add(op(5, range(size, cluster, 0)));
            c.add(op(0, range(size, cluster, 2)));
            return c;
        }

        String op(int op, long[] r) {
            return switch (op) {
                case 0, 1, 2 -> "write -q -P " + pattern() + " " + r[0] + " " + r[1];
                case 3 -> "write -q -z " + r[0] + " " + r[1];
                case 4 -> "write -q -z -u " + r[0] + " " + r[1];
                default -> "discard -q " + r[0] + " " + r[1];
            };
        }

        /** n compressed whole-cluster writes into distinct clusters (qemu cannot compress over an allocated one). */
        List<String> compressed(long size, int cluster, int n) throws IOException {
            List<Long> idx = new ArrayList<>();
            for (long k = 0; k < size / cluster; k++) {
                idx.add(k);
            }
            Collections.shuffle(idx, rnd);
            String[] files = {patternFile(300, false), patternFile(1500, true), patternFile(20000, false),
                    patternFile(cluster, true)};
            List<String> c = new ArrayList<>();
            for (int k = 0; k < Math.min(n, idx.size()); k++) {
                long off = idx.get(k) * cluster;
                if (k % 2 == 0) {
                    c.add("write -q -c -P " + pattern() + " " + off + " " + cluster);
                } else {
                    c.add("write -q -c -s " + files[(k / 2) % files.length] + " " + off + " " + cluster);
                }
            }
            return c;
        }

        void snapshot(String img, String op, String name) {
            Qemu.img(null, "snapshot", op, name, img);
        }
    }

    /** Removes one header extension (by type) from a qcow2 file, keeping the others and everything else. */
    static void dropHeaderExtension(String file, int type) throws IOException {
        try (RandomAccessFile f = new RandomAccessFile(file, "rw")) {
            byte[] h = new byte[4096];
            f.readFully(h);
            ByteBuffer b = ByteBuffer.wrap(h);
            int version = b.getInt(4);
            long backingOffset = b.getLong(8);
            int start = version >= 3 ? b.getInt(100) : 72;
            ByteBuffer kept = ByteBuffer.allocate(4096);
            int p = start;
            boolean found = false;
            while (true) {
                int t = b.getInt(p);
                int len = b.getInt(p + 4);
                int padded = (len + 7) & ~7;
                if (t == 0) {
                    p += 8;
                    break;
                }
                if (t == type) {
                    found = true;
                } else {
                    kept.put(h, p, 8 + padded);
                }
                p += 8 + padded;
            }
            assertThat(found).as("header extension %08x present in %s", type, file).isTrue();
            assertThat(backingOffset == 0 || backingOffset >= p).as("backing name after the extensions").isTrue();
            kept.putLong(0); // end marker
            byte[] area = new byte[p - start];
            System.arraycopy(kept.array(), 0, area, 0, kept.position());
            f.seek(start);
            f.write(area);
        }
    }

    static final int BACKING_FORMAT_EXT = 0xe2792aca;

    static List<Variant> variants() {
        List<Variant> l = new ArrayList<>();

        // --- versions and cluster sizes (some virtual sizes deliberately not a multiple of the cluster size)
        l.add(v("v2-64k", c -> {
            long size = 3 * MiB + 512;
            String img = c.qcow2("img.qcow2", size, "compat=0.10");
            c.io(img, "qcow2", c.workload(size, 65536, 30));
            return img;
        }, f -> {
            assertThat(f.fs("compat")).isEqualTo("0.10");
            assertThat(f.clusterSize()).isEqualTo(65536);
        }));
        l.add(v("v2-4k", c -> {
            long size = 2 * MiB;
            String img = c.qcow2("img.qcow2", size, "compat=0.10,cluster_size=4k");
            c.io(img, "qcow2", c.workload(size, 4096, 30));
            return img;
        }, f -> {
            assertThat(f.fs("compat")).isEqualTo("0.10");
            assertThat(f.clusterSize()).isEqualTo(4096);
        }));
        l.add(v("v3-512", c -> {
            long size = 2 * MiB;
            String img = c.qcow2("img.qcow2", size, "cluster_size=512");
            c.io(img, "qcow2", c.workload(size, 512, 40));
            return img;
        }, f -> {
            assertThat(f.fs("compat")).isEqualTo("1.1");
            assertThat(f.clusterSize()).isEqualTo(512);
        }));
        l.add(v("v3-4k", c -> {
            long size = 4 * MiB;
            String img = c.qcow2("img.qcow2", size, "cluster_size=4k");
            c.io(img, "qcow2", c.workload(size, 4096, 30));
            return img;
        }, f -> assertThat(f.clusterSize()).isEqualTo(4096)));
        l.add(v("v3-64k-odd-size", c -> {
            long size = 4 * MiB + 2560;
            String img = c.qcow2("img.qcow2", size, "");
            c.io(img, "qcow2", c.workload(size, 65536, 30));
            c.io(img, "qcow2", List.of("write -q -P 77 " + (size - 3000) + " 3000"));
            return img;
        }, f -> {
            assertThat(f.fs("compat")).isEqualTo("1.1");
            assertThat(f.clusterSize()).isEqualTo(65536);
            assertThat(f.infoNum("virtual-size")).isEqualTo(4 * MiB + 2560);
        }));
        l.add(v("v3-2M", c -> {
            long size = 64 * MiB;
            String img = c.qcow2("img.qcow2", size, "cluster_size=2M");
            c.io(img, "qcow2", c.workload(size, 2 * 1024 * 1024, 24));
            return img;
        }, f -> assertThat(f.clusterSize()).isEqualTo(2 * MiB)));

        // --- refcount widths
        l.add(v("refcount1-512", c -> {
            long size = 2 * MiB;
            String img = c.qcow2("img.qcow2", size, "refcount_bits=1,cluster_size=512");
            c.io(img, "qcow2", c.workload(size, 512, 30));
            return img;
        }, f -> assertThat(f.fs("refcount-bits")).isEqualTo(BigDecimal.valueOf(1))));
        l.add(v("refcount2-64k", c -> {
            long size = 4 * MiB;
            String img = c.qcow2("img.qcow2", size, "refcount_bits=2");
            c.io(img, "qcow2", c.workload(size, 65536, 30));
            return img;
        }, f -> assertThat(f.fs("refcount-bits")).isEqualTo(BigDecimal.valueOf(2))));
        l.add(v("refcount8-4k", c -> {
            long size = 4 * MiB;
            String img = c.qcow2("img.qcow2", size, "refcount_bits=8,cluster_size=4k");
            c.io(img, "qcow2", c.workload(size, 4096, 30));
            return img;
        }, f -> assertThat(f.fs("refcount-bits")).isEqualTo(BigDecimal.valueOf(8))));
        l.add(v("refcount64-4k", c -> {
            long size = 4 * MiB;
            String img = c.qcow2("img.qcow2", size, "refcount_bits=64,cluster_size=4k");
            c.io(img, "qcow2", c.workload(size, 4096, 30));
            return img;
        }, f -> assertThat(f.fs("refcount-bits")).isEqualTo(BigDecimal.valueOf(64))));

        // --- zero clusters: plain (unallocated + zero flag) and zero-alloc (allocated + zero flag)
        l.add(v("zero-clusters", c -> {
            long size = 4 * MiB;
            String img = c.qcow2("img.qcow2", size, "");
            List<String> cmds = new ArrayList<>(c.workload(size, 65536, 20));
            cmds.addAll(List.of("write -q -P 11 0 1M", "write -q -z 0 256k", "write -q -z -u 256k 256k",
                    "write -q -z 3M 128k", "write -q -z 600000 70000", "write -q -z " + (size - 100000) + " 100000"));
            c.io(img, "qcow2", cmds);
            return img;
        }, f -> {
            assertThat(f.anyExtent(m -> m.get("zero") == Boolean.TRUE && m.get("data") == Boolean.FALSE
                    && m.get("present") == Boolean.TRUE && m.containsKey("offset")))
                    .as("a zero-alloc extent (zero flag on an allocated cluster)").isTrue();
            assertThat(f.anyExtent(m -> m.get("zero") == Boolean.TRUE && m.get("present") == Boolean.TRUE
                    && !m.containsKey("offset"))).as("a plain zero extent").isTrue();
        }));

        // --- compressed clusters
        l.add(v("compressed-zlib-64k", c -> {
            long size = 4 * MiB;
            String img = c.qcow2("img.qcow2", size, "");
            c.io(img, "qcow2", c.compressed(size, 65536, 24));
            c.io(img, "qcow2", c.workload(size, 65536, 10));
            return img;
        }, f -> {
            assertThat(f.fs("compression-type")).isEqualTo("zlib");
            assertThat(f.num(f.check().get("compressed-clusters"))).isPositive();
        }));
        l.add(v("compressed-zstd-64k", c -> {
            long size = 4 * MiB;
            String img = c.qcow2("img.qcow2", size, "compression_type=zstd");
            c.io(img, "qcow2", c.compressed(size, 65536, 24));
            c.io(img, "qcow2", c.workload(size, 65536, 10));
            return img;
        }, f -> {
            assertThat(f.fs("compression-type")).isEqualTo("zstd");
            assertThat(f.num(f.check().get("compressed-clusters"))).isPositive();
        }));
        l.add(v("compressed-zlib-4k", c -> {
            long size = 2 * MiB;
            String img = c.qcow2("img.qcow2", size, "cluster_size=4k");
            c.io(img, "qcow2", c.compressed(size, 4096, 60));
            c.io(img, "qcow2", c.workload(size, 4096, 10));
            return img;
        }, f -> assertThat(f.num(f.check().get("compressed-clusters"))).isPositive()));
        l.add(v("compressed-zlib-512", c -> {
            long size = 1 * MiB;
            String img = c.qcow2("img.qcow2", size, "cluster_size=512");
            c.io(img, "qcow2", c.compressed(size, 512, 80));
            c.io(img, "qcow2", c.workload(size, 512, 10));
            return img;
        }, f -> assertThat(f.num(f.check().get("compressed-clusters"))).isPositive()));
        l.add(v("compressed-zstd-2M", c -> {
            long size = 32 * MiB;
            String img = c.qcow2("img.qcow2", size, "cluster_size=2M,compression_type=zstd");
            c.io(img, "qcow2", c.compressed(size, 2 * 1024 * 1024, 6));
            c.io(img, "qcow2", c.workload(size, 2 * 1024 * 1024, 8));
            return img;
        }, f -> {
            assertThat(f.fs("compression-type")).isEqualTo("zstd");
            assertThat(f.num(f.check().get("compressed-clusters"))).isPositive();
        }));

        // --- extended L2
        l.add(chain("extl2-over-qcow2", c -> {
            long size = 4 * MiB;
            String base = c.qcow2("base.qcow2", size, "cluster_size=4k");
            c.io(base, "qcow2", List.of("write -q -P 1 0 " + size));
            c.io(base, "qcow2", c.workload(size, 4096, 10));
            String img = c.overlay("img.qcow2", "base.qcow2", "qcow2", 0, "extended_l2=on,cluster_size=64k");
            List<String> cmds = new ArrayList<>(List.of("write -q -P 9 2048 2048", "write -q -P 10 71680 512",
                    "write -q -P 12 131072 6144", "write -q -z 200704 2048", "write -q -z -u 264192 4096",
                    "write -q -P 13 330000 777", "discard -q 65536 65536"));
            for (int k = 0; k < 20; k++) {
                long cl = c.rnd.nextLong(size / 65536) * 65536;
                long sub = 2048L * c.rnd.nextInt(32);
                cmds.add("write -q -P " + c.pattern() + " " + (cl + sub) + " " + (2048L * (1 + c.rnd.nextInt(4))));
            }
            cmds.addAll(c.workload(size, 65536, 16));
            c.io(img, "qcow2", cmds);
            return img;
        }, f -> {
            assertThat(f.fs("extended-l2")).isEqualTo(true);
            assertThat(f.anyExtent(m -> f.num(m.get("start")) % 65536 != 0))
                    .as("qemu-img map has an extent boundary inside a cluster").isTrue();
            assertThat(f.maxDepth()).isGreaterThanOrEqualTo(1);
        }));
        l.add(v("extl2-zstd-32k", c -> {
            long size = 4 * MiB;
            String img = c.qcow2("img.qcow2", size, "extended_l2=on,cluster_size=32k,compression_type=zstd");
            c.io(img, "qcow2", c.compressed(size, 32768, 16));
            List<String> cmds = new ArrayList<>(List.of("write -q -P 9 1024 1024", "write -q -z 40960 1024",
                    "write -q -P 3 1048576 32768", "write -q -z 1049600 2048", "discard -q 1052672 1024"));
            for (int k = 0; k < 20; k++) {
                long cl = c.rnd.nextLong(size / 32768) * 32768;
                long sub = 1024L * c.rnd.nextInt(32);
                cmds.add((k % 4 == 3 ? "write -q -z " : "write -q -P " + c.pattern() + " ") + (cl + sub) + " "
                        + (1024L * (1 + c.rnd.nextInt(3))));
            }
            cmds.addAll(c.workload(size, 32768, 12));
            c.io(img, "qcow2", cmds);
            return img;
        }, f -> {
            assertThat(f.fs("extended-l2")).isEqualTo(true);
            assertThat(f.fs("compression-type")).isEqualTo("zstd");
            assertThat(f.num(f.check().get("compressed-clusters"))).isPositive();
            assertThat(f.anyExtent(m -> f.num(m.get("start")) % 32768 != 0))
                    .as("qemu-img map has an extent boundary inside a cluster").isTrue();
        }));

        // --- backing chains
        l.add(chain("qcow2-over-raw", c -> {
            long size = 3 * MiB;
            String base = c.raw("base.raw", size);
            c.io(base, "raw", c.workload(size, 4096, 20));
            String img = c.overlay("img.qcow2", "base.raw", "raw", 0, "cluster_size=16k");
            c.io(img, "qcow2", c.workload(size, 16384, 20));
            return img;
        }, f -> {
            assertThat(f.info().get("backing-filename-format")).isEqualTo("raw");
            assertThat(f.maxDepth()).isEqualTo(1);
        }));
        l.add(chain("chain-3-deep", c -> {
            long size = 4 * MiB;
            String base = c.qcow2("base.qcow2", size, "");
            c.io(base, "qcow2", c.workload(size, 65536, 24));
            String mid = c.overlay("mid.qcow2", "base.qcow2", "qcow2", 0, "compat=0.10,cluster_size=4k");
            c.io(mid, "qcow2", c.workload(size, 4096, 16));
            String img = c.overlay("img.qcow2", "mid.qcow2", "qcow2", 0, "cluster_size=16k");
            c.io(img, "qcow2", c.workload(size, 16384, 16));
            return img;
        }, f -> {
            assertThat(f.maxDepth()).isGreaterThanOrEqualTo(2);
            assertThat(f.anyExtent(m -> f.num(m.get("depth")) == 2 && m.get("data") == Boolean.TRUE))
                    .as("data from the bottom image").isTrue();
        }));
        l.add(chain("short-qcow2-backing", c -> {
            long baseSize = MiB + 1536;
            String base = c.qcow2("base.qcow2", baseSize, "cluster_size=4k");
            c.io(base, "qcow2", List.of("write -q -P 5 0 " + baseSize));
            c.io(base, "qcow2", c.workload(baseSize, 4096, 10));
            long size = 4 * MiB;
            String img = c.overlay("img.qcow2", "base.qcow2", "qcow2", size, "");
            c.io(img, "qcow2", c.workload(size, 65536, 20));
            return img;
        }, f -> {
            assertThat(f.infoNum("virtual-size")).isEqualTo(4 * MiB);
            assertThat(f.maxDepth()).isGreaterThanOrEqualTo(1);
        }));
        l.add(chain("short-raw-backing-odd-size", c -> {
            long baseSize = 1000000;
            String base = c.raw("base.raw", baseSize);
            c.io(base, "raw", List.of("write -q -P 6 0 300000", "write -q -P 7 999000 1000"));
            long size = 4 * MiB;
            String img = c.overlay("img.qcow2", "base.raw", "raw", size, "cluster_size=4k");
            c.io(img, "qcow2", c.workload(size, 4096, 20));
            return img;
        }, f -> assertThat(f.maxDepth()).isGreaterThanOrEqualTo(1)));
        l.add(chain("relative-backing-subdir", c -> {
            long size = 4 * MiB;
            String base0 = c.raw("sub/base0.raw", size);
            c.io(base0, "raw", c.workload(size, 4096, 10));
            // sub/base.qcow2 names "base0.raw", relative to sub/; img.qcow2 names "sub/base.qcow2".
            String base = c.overlay("sub/base.qcow2", "base0.raw", "raw", 0, "");
            c.io(base, "qcow2", c.workload(size, 65536, 12));
            String img = c.overlay("img.qcow2", "sub/base.qcow2", "qcow2", 0, "");
            c.io(img, "qcow2", c.workload(size, 65536, 12));
            // Hand both tools a relative path (from the JVM's working directory) to the top image.
            Path cwd = Path.of("").toAbsolutePath();
            return cwd.relativize(Path.of(img)).toString();
        }, f -> {
            assertThat(f.info().get("backing-filename")).isEqualTo("sub/base.qcow2");
            assertThat(f.maxDepth()).isGreaterThanOrEqualTo(2);
            assertThat((String) f.info().get("filename")).startsWith("..");
        }));
        l.add(chain("backing-without-format-ext-qcow2", c -> {
            long size = 4 * MiB;
            String base = c.qcow2("base.qcow2", size, "cluster_size=4k");
            c.io(base, "qcow2", c.workload(size, 4096, 16));
            String img = c.overlay("img.qcow2", "base.qcow2", "qcow2", 0, "");
            c.io(img, "qcow2", c.workload(size, 65536, 16));
            // qemu-img 7.2 refuses to write a backing name without a format, so remove the extension by hand.
            dropHeaderExtension(img, BACKING_FORMAT_EXT);
            return img;
        }, f -> {
            assertThat(f.info()).containsKey("backing-filename").doesNotContainKey("backing-filename-format");
            assertThat(f.maxDepth()).isGreaterThanOrEqualTo(1);
        }));
        l.add(chain("backing-without-format-ext-raw", c -> {
            long size = 2 * MiB;
            String base = c.raw("base.raw", size);
            c.io(base, "raw", c.workload(size, 4096, 12));
            String img = c.overlay("img.qcow2", "base.raw", "raw", 0, "cluster_size=4k");
            c.io(img, "qcow2", c.workload(size, 4096, 12));
            dropHeaderExtension(img, BACKING_FORMAT_EXT);
            return img;
        }, f -> {
            assertThat(f.info()).containsKey("backing-filename").doesNotContainKey("backing-filename-format");
            assertThat(f.maxDepth()).isGreaterThanOrEqualTo(1);
        }));

        // --- external data file (absolute name: QEMU 7.2 resolves a relative data_file against its cwd)
        l.add(v("data-file", c -> {
            long size = 4 * MiB;
            String img = c.qcow2("img.qcow2", size, "data_file=" + c.path("d.raw"));
            c.io(img, "qcow2", c.workload(size, 65536, 30));
            return img;
        }, f -> {
            assertThat((String) f.fs("data-file")).endsWith("/d.raw");
            assertThat(f.fs("data-file-raw")).isEqualTo(false);
        }));
        l.add(v("data-file-raw", c -> {
            long size = 4 * MiB;
            String img = c.qcow2("img.qcow2", size, "data_file=" + c.path("d.raw") + ",data_file_raw=on,cluster_size=4k");
            c.io(img, "qcow2", c.workload(size, 4096, 30));
            return img;
        }, f -> {
            assertThat((String) f.fs("data-file")).endsWith("/d.raw");
            assertThat(f.fs("data-file-raw")).isEqualTo(true);
        }));

        // --- internal snapshots
        l.add(snaps("snapshots-v3", List.of("s1", "third snapshot"), c -> {
            long size = 4 * MiB;
            String img = c.qcow2("img.qcow2", size, "");
            c.io(img, "qcow2", c.workload(size, 65536, 20));
            c.snapshot(img, "-c", "s1");
            c.io(img, "qcow2", c.workload(size, 65536, 15));
            c.snapshot(img, "-c", "s2");
            c.io(img, "qcow2", c.workload(size, 65536, 10));
            c.snapshot(img, "-c", "third snapshot");
            c.snapshot(img, "-d", "s2");
            c.io(img, "qcow2", c.workload(size, 65536, 10));
            return img;
        }, f -> {
            assertThat((List<?>) f.info().get("snapshots")).hasSize(2);
            assertThat(f.snapshots()).contains("s1").contains("third snapshot").doesNotContain("s2 ");
        }));
        l.add(snaps("snapshots-v2-4k", List.of("a", "b"), c -> {
            long size = 2 * MiB;
            String img = c.qcow2("img.qcow2", size, "compat=0.10,cluster_size=4k");
            c.io(img, "qcow2", c.workload(size, 4096, 20));
            c.snapshot(img, "-c", "a");
            c.io(img, "qcow2", c.workload(size, 4096, 15));
            c.snapshot(img, "-c", "b");
            c.io(img, "qcow2", c.workload(size, 4096, 10));
            return img;
        }, f -> {
            assertThat(f.fs("compat")).isEqualTo("0.10");
            assertThat((List<?>) f.info().get("snapshots")).hasSize(2);
        }));

        // --- preallocation
        for (String mode : List.of("metadata", "falloc", "full")) {
            l.add(v("prealloc-" + mode, c -> {
                long size = 4 * MiB;
                String img = c.qcow2("img.qcow2", size, "preallocation=" + mode);
                c.io(img, "qcow2", c.workload(size, 65536, 20));
                return img;
            }, f -> {
                assertThat(f.num(f.check().get("image-end-offset"))).isGreaterThanOrEqualTo(4 * MiB);
                if (!mode.equals("metadata")) {
                    assertThat(f.infoNum("actual-size")).isGreaterThanOrEqualTo(4 * MiB);
                } else {
                    assertThat(f.infoNum("actual-size")).isLessThan(4 * MiB);
                }
            }));
        }

        // --- resize, lazy refcounts
        l.add(v("resized-grow", c -> {
            long size = 3 * MiB;
            String img = c.qcow2("img.qcow2", size, "cluster_size=16k");
            c.io(img, "qcow2", c.workload(size, 16384, 20));
            long grown = 6 * MiB + 1536;
            Qemu.img(null, "resize", "-q", img, Long.toString(grown));
            c.io(img, "qcow2", List.of("write -q -P 44 " + (size - 1000) + " 5000", "write -q -P 45 " + (grown - 700) + " 700"));
            return img;
        }, f -> assertThat(f.infoNum("virtual-size")).isEqualTo(6 * MiB + 1536)));
        l.add(v("lazy-refcounts", c -> {
            long size = 4 * MiB;
            String img = c.qcow2("img.qcow2", size, "lazy_refcounts=on");
            c.io(img, "qcow2", c.workload(size, 65536, 30));
            return img;
        }, f -> {
            assertThat(f.fs("lazy-refcounts")).isEqualTo(true);
            assertThat(f.info().get("dirty-flag")).isEqualTo(false);
        }));
        l.add(v("lazy-refcounts-dirty", c -> {
            long size = 4 * MiB;
            String img = c.qcow2("img.qcow2", size, "lazy_refcounts=on");
            c.io(img, "qcow2", c.workload(size, 65536, 20));
            // qemu-io "abort" crashes on purpose: the image stays dirty with stale refcounts.
            List<String> cmd = new ArrayList<>(List.of("sh", "-c", "ulimit -c 0; exec qemu-io -f qcow2 \"$@\"", "sh"));
            for (String s : c.workload(size, 65536, 10)) {
                cmd.add("-c");
                cmd.add(s);
            }
            cmd.addAll(List.of("-c", "abort", img));
            Qemu.Result r = Qemu.exec(null, cmd);
            assertThat(r.exit()).as("qemu-io abort: %s", r.err()).isNotZero();
            return img;
        }, f -> {
            assertThat(f.fs("lazy-refcounts")).isEqualTo(true);
            assertThat(f.info().get("dirty-flag")).isEqualTo(true);
        }));

        // --- raw tops
        l.add(v("raw-sparse", c -> {
            long size = 4 * MiB;
            String img = c.raw("img.raw", size);
            c.io(img, "raw", c.workload(size, 4096, 30));
            return img;
        }, f -> {
            assertThat(f.info().get("format")).isEqualTo("raw");
            assertThat(f.anyExtent(m -> m.get("data") == Boolean.FALSE)).as("a hole").isTrue();
            assertThat(f.anyExtent(m -> m.get("data") == Boolean.TRUE)).as("data").isTrue();
        }));
        l.add(v("raw-odd-size", c -> {
            long size = 1000000;
            String img = c.raw("img.raw", size);
            c.io(img, "raw", List.of("write -q -P 7 999000 1000", "write -q -P 8 4096 5000"));
            return img;
        }, f -> {
            assertThat(f.info().get("format")).isEqualTo("raw");
            assertThat(f.infoNum("virtual-size")).isEqualTo(1000448);
        }));
        return l;
    }

    // ------------------------------------------------------------------------------------------------ the tests

    /** Builds a variant once, on first use, and remembers the outcome (an image path or the failure). */
    static final class Built {
        final Variant variant;
        final Path dir;
        private String image;
        private Facts facts;
        private Throwable failure;

        Built(Variant variant, Path dir) {
            this.variant = variant;
            this.dir = dir;
        }

        synchronized String image() throws Throwable {
            if (failure != null) {
                throw new AssertionError("building " + variant.name() + " failed", failure);
            }
            if (image == null) {
                try {
                    Files.createDirectories(dir);
                    String img = variant.build().build(new Ctx(dir, SEED ^ variant.name().hashCode()));
                    facts = qemuFacts(img);
                    image = img;
                } catch (Throwable t) {
                    failure = t;
                    throw t;
                }
            }
            return image;
        }

        Facts facts() throws Throwable {
            image();
            return facts;
        }
    }

    @SuppressWarnings("unchecked")
    static Facts qemuFacts(String img) {
        Map<String, Object> info = (Map<String, Object>) Json.parse(Qemu.img(null, "info", "--output=json", img));
        Map<String, Object> check = null;
        if ("qcow2".equals(info.get("format"))) {
            Qemu.Result r = Qemu.imgRaw(null, "check", "--output=json", img);
            if (Boolean.TRUE.equals(info.get("dirty-flag"))) {
                assertThat(r.exit()).as("check of a dirty image").isIn(0, 2, 3);
            } else {
                r.ok();
            }
            check = (Map<String, Object>) Json.parse(r.out());
        }
        List<Map<String, Object>> map = (List<Map<String, Object>>) Json.parse(Qemu.img(null, "map", "--output=json", img));
        String snapshots = "qcow2".equals(info.get("format")) ? Qemu.img(null, "snapshot", "-l", img) : "";
        return new Facts(info, check, map, snapshots);
    }

    @TestFactory
    Stream<DynamicNode> conformance() {
        return variants().stream().map(v -> {
            Built b = new Built(v, root.resolve(v.name().replace(' ', '_')));
            List<DynamicNode> tests = new ArrayList<>();
            tests.add(dynamicTest("qemu builds it with the feature", () -> v.features().check(b.facts())));
            tests.add(dynamicTest("convert -O raw", () -> checkConvert(b, null)));
            for (String s : v.snapshots()) {
                tests.add(dynamicTest("convert -O raw -l snapshot.name=" + s, () -> checkConvert(b, s)));
            }
            tests.add(dynamicTest("map --output=json", () -> checkMap(b)));
            tests.add(dynamicTest("map -f FMT -U --output=json", () -> checkMapExplicitFormat(b)));
            tests.add(dynamicTest("info --output=json", () -> checkInfo(b, false)));
            if (v.chain()) {
                tests.add(dynamicTest("info --backing-chain --output=json", () -> checkInfo(b, true)));
            }
            tests.add(dynamicTest("compare (identical and one byte off)", () -> checkCompare(b)));
            if (!v.snapshots().isEmpty()) {
                tests.add(dynamicTest("snapshot -l", () -> checkSnapshotList(b)));
            }
            tests.add(dynamicTest("extra: map (human)", () -> checkText(b, "map")));
            tests.add(dynamicTest("extra: info (human)", () -> checkText(b, "info")));
            // Last: it rewrites the image's files.
            tests.add(dynamicTest("convert -O raw, image files out of the page cache", () -> checkConvertCold(b)));
            return dynamicContainer(v.name(), tests);
        });
    }

    static String refRaw(Built b, String snapshot) throws Throwable {
        String img = b.image();
        String ref = b.dir.resolve(snapshot == null ? "ref.raw" : "ref-" + snapshot.replace(' ', '_') + ".raw").toString();
        if (!Files.exists(Path.of(ref))) {
            if (snapshot == null) {
                Qemu.img(null, "convert", "-O", "raw", img, ref);
            } else {
                Qemu.img(null, "convert", "-O", "raw", "-l", "snapshot.name=" + snapshot, img, ref);
            }
        }
        return ref;
    }

    static void checkConvert(Built b, String snapshot) throws Throwable {
        String img = b.image();
        String ref = refRaw(b, snapshot);
        String out = b.dir.resolve(snapshot == null ? "ours.raw" : "ours-" + snapshot.replace(' ', '_') + ".raw").toString();
        Files.deleteIfExists(Path.of(out));
        if (snapshot == null) {
            oursOk("convert", "-O", "raw", img, out);
        } else {
            oursOk("convert", "-O", "raw", "-l", "snapshot.name=" + snapshot, img, out);
        }
        long refSize = Files.size(Path.of(ref));
        long outSize = Files.size(Path.of(out));
        long mismatch = Files.mismatch(Path.of(ref), Path.of(out));
        if (mismatch >= 0) {
            fail("%s: our raw differs from qemu-img's at byte %d (0x%x)%s: qemu %s, ours %s", b.variant.name(), mismatch,
                    mismatch, refSize != outSize ? " (sizes " + refSize + " vs ours " + outSize + ")" : "",
                    bytesAt(ref, mismatch), bytesAt(out, mismatch));
        }
    }

    /**
     * The same convert once every file of the image (backing and data files too) is out of the page cache: convert
     * then reads around the cache in large gathered reads, a path the warm convert above does not take.
     */
    static void checkConvertCold(Built b) throws Throwable {
        b.image(); // built once, or its build failure again
        refRaw(b, null);
        try (Stream<Path> files = Files.list(b.dir)) {
            for (Path f : files.toList()) {
                String n = f.getFileName().toString();
                if (Files.isRegularFile(f, java.nio.file.LinkOption.NOFOLLOW_LINKS) && !n.startsWith("ref")
                        && !n.startsWith("ours")) {
                    PageCache.evict(f);
                }
            }
        }
        checkConvert(b, null);
    }

    static String bytesAt(String file, long off) throws IOException {
        try (RandomAccessFile f = new RandomAccessFile(file, "r")) {
            if (off >= f.length()) {
                return "<EOF>";
            }
            f.seek(off);
            byte[] b = new byte[(int) Math.min(16, f.length() - off)];
            f.readFully(b);
            StringBuilder s = new StringBuilder();
            for (byte x : b) {
                s.append(String.format("%02x", x & 0xff));
            }
            return s.toString();
        }
    }

    static void checkMap(Built b) throws Throwable {
        String img = b.image();
        String theirs = Qemu.img(null, "map", "--output=json", img).stripTrailing();
        String mine = oursOk("map", "--output=json", img).out().stripTrailing();
        assertSameText("map --output=json " + img, theirs, mine);
    }

    static void checkMapExplicitFormat(Built b) throws Throwable {
        String img = b.image();
        String fmt = (String) b.facts().info().get("format");
        String theirs = Qemu.img(null, "map", "-f", fmt, "-U", "--output=json", img).stripTrailing();
        String mine = oursOk("map", "-f", fmt, "-U", "--output=json", img).out().stripTrailing();
        assertSameText("map -f " + fmt + " -U --output=json " + img, theirs, mine);
    }

    static void checkInfo(Built b, boolean chain) throws Throwable {
        String img = b.image();
        String[] args = chain ? new String[] {"info", "--backing-chain", "--output=json", img}
                : new String[] {"info", "--output=json", img};
        String theirs = Qemu.img(null, args);
        String mine = oursOk(args).out();
        Object expected = Json.parse(theirs);
        Object actual;
        try {
            actual = Json.parse(mine);
        } catch (IllegalArgumentException e) {
            throw new AssertionError("our info output is not JSON: " + e.getMessage() + "\n" + mine, e);
        }
        List<String> diffs = Json.missingOrDifferent(expected, actual);
        assertThat(diffs).as("keys of qemu-img %s missing from or different in ours%nqemu:%n%s%nours:%n%s",
                String.join(" ", args), theirs, mine).isEmpty();
    }

    static void checkCompare(Built b) throws Throwable {
        String img = b.image();
        String ref = refRaw(b, null);
        Qemu.Result theirs = Qemu.imgRaw(null, "compare", img, ref);
        Run mine = ours("compare", img, ref);
        assertThat(theirs.exit()).as("qemu-img compare IMG its own convert: %s", theirs.err()).isZero();
        assertThat(mine.exit()).as("exit of compare IMG ref.raw; stderr %s", mine.err()).isEqualTo(theirs.exit());
        assertThat(mine.out()).as("stdout of compare IMG ref.raw").isEqualTo(theirs.out());

        // One byte changed at a seeded offset in a copy: both must name the same offset and exit 1.
        Path bad = b.dir.resolve("bad.raw");
        Files.copy(Path.of(ref), bad, java.nio.file.StandardCopyOption.REPLACE_EXISTING);
        long size = Files.size(bad);
        long off = new Random(SEED ^ b.variant.name().hashCode() ^ 1).nextLong(size);
        try (RandomAccessFile f = new RandomAccessFile(bad.toFile(), "rw")) {
            f.seek(off);
            int x = f.read();
            f.seek(off);
            f.write(x ^ 0x5a);
        }
        theirs = Qemu.imgRaw(null, "compare", img, bad.toString());
        mine = ours("compare", img, bad.toString());
        assertThat(theirs.exit()).as("qemu-img compare with one byte off").isEqualTo(1);
        assertThat(mine.exit()).as("exit of compare IMG bad.raw; stderr %s", mine.err()).isEqualTo(theirs.exit());
        assertThat(mine.out()).as("stdout of compare IMG bad.raw (byte changed at %d)", off).isEqualTo(theirs.out());
    }

    static void checkSnapshotList(Built b) throws Throwable {
        String img = b.image();
        String theirs = Qemu.img(null, "snapshot", "-l", img);
        String mine = oursOk("snapshot", "-l", img).out();
        assertSameText("snapshot -l " + img, theirs, mine);
    }

    /** Human output: same exit code and same stdout (qemu-img's human map fails on compressed clusters). */
    static void checkText(Built b, String command) throws Throwable {
        String img = b.image();
        Qemu.Result theirs = Qemu.imgRaw(null, command, img);
        Run mine = ours(command, img);
        String t = theirs.out().stripTrailing();
        String m = mine.out().stripTrailing();
        if (mine.exit() != theirs.exit() || !t.equals(m)) {
            fail("%s %s (human output): exit qemu-img %d, qdedup %d%nstderr qemu-img: %s%nstderr qdedup: %s%n"
                    + "stdout (- qemu-img, + qdedup):%n%s", command, img, theirs.exit(), mine.exit(),
                    theirs.err().strip(), mine.err().strip(), t.equals(m) ? "(same)" : lineDiff(t, m));
        }
    }

    /** Fails with a short line diff (qemu-img's lines as "-", ours as "+", two lines of context). */
    static void assertSameText(String what, String theirs, String mine) {
        if (!theirs.equals(mine)) {
            fail("%s differs (- qemu-img, + qdedup):%n%s", what, lineDiff(theirs, mine));
        }
    }

    static String lineDiff(String a, String b) {
        String[] x = a.split("\n", -1);
        String[] y = b.split("\n", -1);
        int[][] lcs = new int[x.length + 1][y.length + 1];
        for (int i = x.length - 1; i >= 0; i--) {
            for (int j = y.length - 1; j >= 0; j--) {
                lcs[i][j] = x[i].equals(y[j]) ? lcs[i + 1][j + 1] + 1 : Math.max(lcs[i + 1][j], lcs[i][j + 1]);
            }
        }
        List<String> ops = new ArrayList<>();
        int i = 0;
        int j = 0;
        while (i < x.length || j < y.length) {
            if (i < x.length && j < y.length && x[i].equals(y[j])) {
                ops.add("  " + x[i++]);
                j++;
            } else if (j < y.length && (i == x.length || lcs[i][j + 1] >= lcs[i + 1][j])) {
                ops.add("+ " + y[j++]);
            } else {
                ops.add("- " + x[i++]);
            }
        }
        StringBuilder out = new StringBuilder();
        int last = -1;
        for (int k = 0; k < ops.size(); k++) {
            boolean near = false;
            for (int d = -2; d <= 2; d++) {
                int n = k + d;
                if (n >= 0 && n < ops.size() && !ops.get(n).startsWith("  ")) {
                    near = true;
                }
            }
            if (near) {
                if (last >= 0 && k != last + 1) {
                    out.append("  ...\n");
                }
                out.append(ops.get(k)).append('\n');
                last = k;
            }
        }
        return out.toString();
    }
}
