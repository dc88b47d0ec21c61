package org.qdedup;

import static org.assertj.core.api.Assertions.assertThat;

import java.io.ByteArrayOutputStream;
import java.io.PrintStream;
import java.io.RandomAccessFile;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Map;
import java.util.Random;
import java.util.stream.Stream;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.Arguments;
import org.junit.jupiter.params.provider.CsvSource;
import org.junit.jupiter.params.provider.MethodSource;
import org.junit.jupiter.params.provider.ValueSource;
import org.qdedup.cli.Main;

/**
 * The writing commands of the CLI against qemu-img: {@code create} makes the image qemu-img makes with the same
 * options, {@code convert -O qcow2} gives clean images identical to their sources, and bad options and locked
 * images fail with exit 1 and one line.
 */
class CliWriteTest {
    @TempDir
    Path dir;

    record Run(List<String> args, int rc, String out, String err) {
        Run ok() {
            assertThat(rc).as("qdedup %s exit; stderr: %s", String.join(" ", args), err).isZero();
            return this;
        }

        /** Exit 1 and exactly one line on stderr, "qdedup: ...". */
        Run failsWithOneLine() {
            assertThat(rc).as("qdedup %s exit; stdout: %s; stderr: %s", String.join(" ", args), out, err).isEqualTo(1);
            assertThat(err).as("stderr of qdedup %s", String.join(" ", args)).startsWith("qdedup: ").endsWith("\n");
            assertThat(err.strip()).as("one line").doesNotContain("\n");
            return this;
        }
    }

    static Run cli(String... args) {
        ByteArrayOutputStream o = new ByteArrayOutputStream(), e = new ByteArrayOutputStream();
        int rc = Main.run(args, new PrintStream(o, true, StandardCharsets.UTF_8), new PrintStream(e, true, StandardCharsets.UTF_8));
        return new Run(List.of(args), rc, o.toString(StandardCharsets.UTF_8), e.toString(StandardCharsets.UTF_8));
    }

    private String p(String name) {
        return dir.resolve(name).toString();
    }

    private void assertCheckClean(Path d, String img) {
        Qemu.Result r = Qemu.imgRaw(d, "check", img);
        assertThat(r.exit()).as("qemu-img check %s exit (0 clean, 2 corrupt, 3 leaks):%n%s%s", img, r.out(), r.err()).isZero();
    }

    private static Object info(Path d, String img) {
        return Json.parse(Qemu.img(d, "info", "--output=json", img));
    }

    // ---- 6. create ---------------------------------------------------------------------------------------------

    static Stream<Arguments> createCases() {
        List<Arguments> out = new ArrayList<>();
        for (String cs : new String[]{"512", "4k", "64k", "2M"}) {
            out.add(Arguments.of("cluster_size=" + cs, "64M"));
        }
        out.add(Arguments.of("cluster_size=512", "1G"));
        out.add(Arguments.of("cluster_size=512,refcount_bits=1", "1G"));
        out.add(Arguments.of("cluster_size=512,refcount_bits=64", "100M"));
        out.add(Arguments.of("compat=0.10", "64M"));
        out.add(Arguments.of("compat=v2,cluster_size=4k", "64M"));
        out.add(Arguments.of("compat=1.1", "64M"));
        for (int bits = 1; bits <= 64; bits *= 2) {
            out.add(Arguments.of("refcount_bits=" + bits, "256M"));
        }
        out.add(Arguments.of("extended_l2=on,cluster_size=16k", "64M"));
        out.add(Arguments.of("extended_l2=on", "64M"));
        out.add(Arguments.of("extended_l2=on,cluster_size=2M", "64M"));
        out.add(Arguments.of("lazy_refcounts=on", "64M"));
        out.add(Arguments.of("compression_type=zstd", "64M"));
        out.add(Arguments.of("compression_type=zstd,extended_l2=on,lazy_refcounts=on,refcount_bits=32,cluster_size=32k", "3G"));
        out.add(Arguments.of("data_file=img.data", "64M"));
        out.add(Arguments.of("data_file=img.data,data_file_raw=on", "64M"));
        out.add(Arguments.of("-b", "64M"));
        out.add(Arguments.of("-b,compat=0.10,cluster_size=4k", "32M"));
        out.add(Arguments.of("-b", ""));
        out.add(Arguments.of("backing_file=base.qcow2,backing_fmt=qcow2,cluster_size=16k", "20M"));
        return out.stream();
    }

    @ParameterizedTest(name = "{0} {1}")
    @MethodSource("createCases")
    void createMatchesQemuImg(String spec, String size) throws Exception {
        Path ours = Files.createDirectories(dir.resolve("ours"));
        Path theirs = Files.createDirectories(dir.resolve("theirs"));
        List<String> extra = new ArrayList<>();
        String opts = spec;
        boolean backing = spec.startsWith("-b") || spec.startsWith("backing");
        if (backing) {
            for (Path d : new Path[]{ours, theirs}) {
                Qemu.img(d, "create", "-f", "qcow2", "base.qcow2", "48M");
                Qemu.io(d, "qcow2", "base.qcow2", List.of("write -P 0x42 0 1M"));
            }
        }
        if (spec.startsWith("-b")) {
            extra.addAll(List.of("-b", "base.qcow2", "-F", "qcow2"));
            opts = spec.contains(",") ? spec.substring(spec.indexOf(',') + 1) : "";
        }
        List<String> tail = new ArrayList<>(extra);
        if (!opts.isEmpty()) {
            tail.addAll(List.of("-o", opts));
        }
        // qemu-img runs in its image's directory: it creates a relative data_file name relative to its cwd.
        List<String> q = new ArrayList<>(List.of("create", "-f", "qcow2"));
        q.addAll(tail);
        q.add("img.qcow2");
        List<String> c = new ArrayList<>(List.of("create", "-f", "qcow2"));
        c.addAll(tail);
        c.add(ours.resolve("img.qcow2").toString());
        if (!size.isEmpty()) {
            q.add(size);
            c.add(size);
        }
        Qemu.img(theirs, q.toArray(String[]::new));
        Run r = cli(c.toArray(String[]::new)).ok();
        assertThat(r.out()).startsWith("Formatting '");

        assertCheckClean(ours, "img.qcow2");
        Object mine = info(ours, "img.qcow2");
        Object ref = info(theirs, "img.qcow2");
        for (String key : new String[]{"format-specific", "virtual-size", "cluster-size", "dirty-flag", "backing-filename",
                "backing-filename-format", "format"}) {
            assertThat(Json.at(mine, key)).as("info %s (qemu-img: %s)", key, Json.show(Json.at(ref, key)))
                    .isEqualTo(Json.at(ref, key));
        }
        if (backing) {
            assertThat(Json.at(mine, "backing-filename")).isEqualTo("base.qcow2");
            assertThat(Json.at(mine, "full-backing-filename")).isEqualTo(Json.at(ref, "full-backing-filename"));
        }
        if (spec.contains("data_file")) {
            assertThat(ours.resolve("img.data")).exists();
        }
        // The image works: QEMU writes into it, reads its writes back, and it stays clean. (qemu-io runs in the image's
        // directory: QEMU 7.2 opens a relative data_file name relative to its cwd.)
        Qemu.io(ours, "qcow2", "img.qcow2", List.of("write -P 0x55 1000 200k", "write -z 3M 64k", "write -P 0x56 5M 512"));
        Qemu.io(ours, "qcow2", "img.qcow2", List.of("read -P 0x55 1000 200k", "read -P 0 3M 64k", "read -P 0x56 5M 512",
                "read -P 0 4M 64k"));
        assertCheckClean(ours, "img.qcow2");
    }

    @ParameterizedTest(name = "{0}")
    @ValueSource(strings = {"-o cluster_size=1000", "-o compat=v2,refcount_bits=8", "-o extended_l2=on,cluster_size=4k",
            "-o compat=0.10,lazy_refcounts=on", "-o refcount_bits=128", "-o refcount_bits=3", "-o cluster_size=4M",
            "-o compat=0.10,data_file=x.data", "-o compression_type=lz4", "-o bogus=1", "-b base.qcow2",
            "-o backing_file=base.qcow2", "-o cluster_size=4k 9T", "NOSIZE"})
    void createRejectsBadOptionsWithOneLine(String spec) throws Exception {
        Qemu.img(dir, "create", "-f", "qcow2", "base.qcow2", "1M");
        List<String> args = new ArrayList<>(List.of("create", "-f", "qcow2"));
        String size = "1M";
        if (spec.endsWith(" 9T")) {
            size = "9T";
            spec = spec.substring(0, spec.length() - 3);
        }
        if (!spec.equals("NOSIZE")) {
            args.addAll(Arrays.asList(spec.split(" ")));
        }
        List<String> qargs = new ArrayList<>(args);
        qargs.add("q.qcow2");
        args.add(p("bad.qcow2"));
        if (!spec.equals("NOSIZE")) {
            qargs.add(size);
            args.add(size);
        }
        // Sanity: qemu-img refuses it too (except the 8 TiB cap on 4 KiB clusters, our documented limit).
        if (!size.equals("9T")) {
            assertThat(Qemu.imgRaw(dir, qargs.toArray(String[]::new)).exit()).as("qemu-img refuses it as well").isNotZero();
        }
        cli(args.toArray(String[]::new)).failsWithOneLine();
        assertThat(dir.resolve("bad.qcow2")).as("no image left behind").doesNotExist();
    }

    /** The contract's {@code qdedup COMMAND --help}: usage on stdout, exit 0, for every command. */
    @Test
    void everyCommandPrintsItsUsageWithHelp() throws Exception {
        for (String c : new String[]{"info", "map", "check", "compare", "convert", "create", "snapshot", "resize", "commit",
                "rebase", "stats", "estimate", "dedup", "serve", "demo"}) {
            Run r = cli(c, "--help");
            assertThat(r.rc()).as(c + " --help: %s", r.err()).isZero();
            assertThat(r.out()).as(c + " --help").startsWith("Usage: qdedup " + c).contains("--help");
        }
        Run v = cli("--version");
        assertThat(v.rc()).isZero();
        assertThat(v.out()).startsWith("qdedup ");
        assertThat(cli("help", "convert").out()).startsWith("Usage: qdedup convert");
        // The help options come only where an argument may ask for them: each way of asking must still find them.
        assertThat(cli("-V").out()).startsWith("qdedup ");
        assertThat(cli("--help").out()).startsWith("Usage: qdedup").contains("convert");
        assertThat(cli("info", "-h").out()).startsWith("Usage: qdedup info");
        assertThat(cli("info", "-V").out()).startsWith("qdedup ");
        assertThat(cli("info", "--version").out()).startsWith("qdedup ");
        assertThat(cli("info", "-Uh").out()).startsWith("Usage: qdedup info");
        Path argFile = dir.resolve("help.args");
        Files.writeString(argFile, "--help\n");
        assertThat(cli("info", "@" + argFile).out()).startsWith("Usage: qdedup info");
        Run missing = cli("info");
        assertThat(missing.rc()).isNotZero();
        assertThat(missing.err()).contains("Missing required parameter");
    }

    @Test
    void createAndConvertRefuseAnImageInUseAndLeaveItAlone() throws Exception {
        String img = p("busy.qcow2");
        Qemu.img(dir, "create", "-f", "qcow2", img, "16M");
        Qemu.io(dir, "qcow2", img, List.of("write -P 0x66 0 256k"));
        String src = p("src.raw");
        try (RandomAccessFile f = new RandomAccessFile(src, "rw")) {
            f.setLength(16L << 20);
            f.write(new byte[]{1, 2, 3});
        }
        byte[] before = Files.readAllBytes(Path.of(img));
        try (WriterFeaturesTest.Nbd nbd = new WriterFeaturesTest.Nbd(dir, img)) {
            cli("create", "-f", "qcow2", img, "16M").failsWithOneLine();
            assertUnchanged(img, before, "create left the busy image alone");
            cli("create", "-f", "raw", img, "16M").failsWithOneLine();
            assertUnchanged(img, before, "create -f raw left the busy image alone");
            cli("convert", "-n", "-O", "qcow2", src, img).failsWithOneLine();
            cli("convert", "-O", "qcow2", src, img).failsWithOneLine();
            assertUnchanged(img, before, "convert left the busy image alone");
            cli("convert", "-O", "raw", src, img).failsWithOneLine();
            assertUnchanged(img, before, "convert -O raw left the busy image alone");
        }
        assertCheckClean(dir, img);
        Qemu.io(dir, "qcow2", img, List.of("read -P 0x66 0 256k"));
        // Once free, create replaces it: a fresh qcow2, then a raw file of zeros (none of the old bytes survive).
        cli("create", "-f", "qcow2", img, "16M").ok();
        assertCheckClean(dir, img);
        Qemu.io(dir, "qcow2", img, List.of("read -P 0 0 256k"));
        cli("create", "-f", "raw", img, "1M").ok();
        byte[] raw = Files.readAllBytes(Path.of(img));
        assertThat(raw.length).isEqualTo(1 << 20);
        assertThat(Arrays.mismatch(raw, new byte[1 << 20])).as("raw create over an old image: all zeros").isEqualTo(-1);
    }

    private static void assertUnchanged(String img, byte[] before, String what) throws Exception {
        byte[] now = Files.readAllBytes(Path.of(img));
        assertThat(Arrays.equals(now, before)).as("%s (%d bytes before, %d now, first difference at %d)", what, before.length,
                now.length, Arrays.mismatch(now, before)).isTrue();
    }

    // ---- 7. convert -O qcow2 -----------------------------------------------------------------------------------

    /** Builds the sources; returns name -> {path of the source to convert, extra args, reference to compare with}. */
    private Map<String, String[]> sources() throws Exception {
        long size = 8L << 20;
        // A raw file with holes, data, and written zeros.
        String raw = p("holes.raw");
        try (RandomAccessFile f = new RandomAccessFile(raw, "rw")) {
            f.setLength(size);
            Random r = new Random(7);
            byte[] b = new byte[300_000];
            r.nextBytes(b);
            f.seek(12345);
            f.write(b);
            f.seek(3L << 20);
            f.write(new byte[200_000]);
            Arrays.fill(b, (byte) 0x77);
            f.seek(size - 70_000);
            f.write(b, 0, 70_000);
        }
        // A qcow2 with compressed clusters.
        Qemu.img(dir, "create", "-f", "qcow2", "plain.qcow2", "8M");
        Qemu.io(dir, "qcow2", "plain.qcow2", List.of("write -P 0x31 0 1M", "write -P 0x32 2M 100k", "write -P 0x33 7M 1M"));
        Qemu.img(dir, "convert", "-c", "-O", "qcow2", "plain.qcow2", "comp.qcow2");
        List<?> map = (List<?>) Json.parse(Qemu.img(dir, "map", "--output=json", "comp.qcow2"));
        assertThat(map).as("sanity: compressed clusters (data without an offset)")
                .anyMatch(m -> Boolean.TRUE.equals(((Map<?, ?>) m).get("data")) && !((Map<?, ?>) m).containsKey("offset"));
        // A qcow2 with a backing file (partial writes, zeros over backing data).
        Qemu.img(dir, "create", "-f", "qcow2", "-o", "cluster_size=65536", "base.qcow2", "8M");
        Qemu.io(dir, "qcow2", "base.qcow2", List.of("write -P 0x41 0 8M"));
        Qemu.img(dir, "create", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "base.qcow2", "-F", "qcow2", "over.qcow2");
        Qemu.io(dir, "qcow2", "over.qcow2", List.of("write -P 0x42 1000 5000", "write -z 1M 1M", "write -z 3M 100k",
                "discard 5M 64k", "write -P 0x43 6M 4k"));
        // A snapshot: converted with -l, compared with what qemu-img converts from it.
        Qemu.img(dir, "create", "-f", "qcow2", "snap.qcow2", "8M");
        Qemu.io(dir, "qcow2", "snap.qcow2", List.of("write -P 0x51 0 3M", "write -P 0x52 5M 64k"));
        Qemu.img(dir, "snapshot", "-c", "s1", "snap.qcow2");
        Qemu.io(dir, "qcow2", "snap.qcow2", List.of("write -P 0x53 1M 3M", "write -z 5M 64k"));
        Qemu.img(dir, "convert", "-O", "raw", "-l", "snapshot.name=s1", "snap.qcow2", "snap-s1.raw");
        return Map.of(
                "raw-holes", new String[]{raw, "", raw},
                "compressed", new String[]{p("comp.qcow2"), "", p("comp.qcow2")},
                "backing", new String[]{p("over.qcow2"), "", p("over.qcow2")},
                "snapshot", new String[]{p("snap.qcow2"), "snapshot.name=s1", p("snap-s1.raw")});
    }

    @ParameterizedTest(name = "-o {0}")
    @ValueSource(strings = {"", "cluster_size=4k", "cluster_size=512", "cluster_size=2M", "compat=0.10", "refcount_bits=1",
            "extended_l2=on", "compression_type=zstd,lazy_refcounts=on,refcount_bits=64", "data_file=conv.data",
            "data_file=conv.data,data_file_raw=on,extended_l2=on"})
    void convertToQcow2IsCleanAndIdentical(String opts) throws Exception {
        Map<String, String[]> srcs = sources();
        for (Map.Entry<String, String[]> e : srcs.entrySet()) {
            String name = e.getKey();
            String[] s = e.getValue();
            String dst = p("out-" + name + ".qcow2");
            List<String> args = new ArrayList<>(List.of("convert", "-O", "qcow2"));
            if (!opts.isEmpty()) {
                args.addAll(List.of("-o", opts));
            }
            if (!s[1].isEmpty()) {
                args.addAll(List.of("-l", s[1]));
            }
            args.add(s[0]);
            args.add(dst);
            Run r = cli(args.toArray(String[]::new)).ok();
            assertThat(r.out()).as("convert prints nothing").isEmpty();
            assertCheckClean(dir, dst);
            Qemu.Result cmp = Qemu.imgRaw(dir, "compare", "-F", "qcow2", s[2], dst);
            assertThat(cmp.exit()).as("%s: qemu-img compare %s %s: %s%s", name, s[2], dst, cmp.out(), cmp.err()).isZero();
            Object info = info(dir, dst);
            assertThat(Json.at(info, "backing-filename")).as("%s: flattened", name).isNull();
            if (!opts.equals("compat=0.10")) {
                assertThat(Json.at(info, "format-specific", "data", "corrupt")).isEqualTo(Boolean.FALSE);
            }
            assertThat(((Number) Json.at(info, "virtual-size")).longValue()).isEqualTo(8L << 20);
            long cs = ((Number) Json.at(info, "cluster-size")).longValue();
            assertThat(cs).isEqualTo(switch (opts) {
                case "cluster_size=4k" -> 4096L;
                case "cluster_size=512" -> 512L;
                case "cluster_size=2M" -> 2L << 20;
                default -> 65536L;
            });
            Object data = Json.at(info, "format-specific", "data");
            assertThat(Json.at(data, "compat")).isEqualTo(opts.equals("compat=0.10") ? "0.10" : "1.1");
            if (opts.equals("refcount_bits=1")) {
                assertThat(Json.at(data, "refcount-bits").toString()).isEqualTo("1");
            }
            if (opts.contains("data_file")) {
                assertThat(Json.at(data, "data-file")).isEqualTo("conv.data");
                assertThat(Json.at(data, "data-file-raw")).isEqualTo(opts.contains("data_file_raw=on"));
            }
            if (opts.contains("data_file_raw=on")) {
                // The data file alone is the guest's disk.
                assertThat(Qemu.imgRaw(dir, "compare", "-f", "raw", "-F", s[2].endsWith(".raw") ? "raw" : "qcow2",
                        p("conv.data"), s[2]).exit()).as("%s: raw data file equals the source", name).isZero();
            }
            if (opts.contains("extended_l2=on")) {
                assertThat(Json.at(data, "extended-l2")).isEqualTo(Boolean.TRUE);
            }
        }
    }

    @ParameterizedTest(name = "{0}")
    @CsvSource({"plain,4k", "plain,64k", "backing-v3,64k", "backing-v2,64k", "snapshot,64k", "extl2,32k"})
    void convertIntoExistingImageOverwritesEverythingZerosIncluded(String target, String cs) throws Exception {
        long size = 8L << 20;
        String raw = p("holes.raw");
        try (RandomAccessFile f = new RandomAccessFile(raw, "rw")) {
            f.setLength(size);
            byte[] b = new byte[100_000];
            new Random(3).nextBytes(b);
            f.seek(777);
            f.write(b);
            f.seek(6L << 20);
            f.write(b);
        }
        String opts = "cluster_size=" + cs + (target.equals("backing-v2") ? ",compat=0.10" : "")
                + (target.equals("extl2") ? ",extended_l2=on" : "");
        if (target.startsWith("backing")) {
            Qemu.img(dir, "create", "-f", "qcow2", "bk.qcow2", "8M");
            Qemu.io(dir, "qcow2", "bk.qcow2", List.of("write -P 0xbb 0 8M"));
            Qemu.img(dir, "create", "-f", "qcow2", "-o", opts, "-b", "bk.qcow2", "-F", "qcow2", "t.qcow2");
            Qemu.io(dir, "qcow2", "t.qcow2", List.of("write -P 0xcc 1M 1M", "write -P 0xdd 100 1000"));
        } else {
            Qemu.img(dir, "create", "-f", "qcow2", "-o", opts, "t.qcow2", "8M");
            Qemu.io(dir, "qcow2", "t.qcow2", List.of("write -P 0xff 0 8M", "write -P 0xee 64k 10k", "write -z 2M 1M"));
        }
        if (target.equals("snapshot")) {
            Qemu.img(dir, "snapshot", "-c", "keep", "t.qcow2");
            Qemu.img(dir, "convert", "-O", "raw", "-l", "snapshot.name=keep", "t.qcow2", "keep.raw");
        }
        cli("convert", "-n", "-f", "raw", "-O", "qcow2", raw, p("t.qcow2")).ok();
        assertCheckClean(dir, "t.qcow2");
        Qemu.Result cmp = Qemu.imgRaw(dir, "compare", "-f", "raw", "-F", "qcow2", raw, "t.qcow2");
        assertThat(cmp.exit()).as("qemu-img compare: %s%s", cmp.out(), cmp.err()).isZero();
        if (target.startsWith("backing")) {
            assertThat(Json.at(info(dir, "t.qcow2"), "backing-filename")).as("-n keeps the target's backing file")
                    .isEqualTo("bk.qcow2");
        }
        if (target.equals("snapshot")) {
            Qemu.img(dir, "convert", "-O", "raw", "-l", "snapshot.name=keep", "t.qcow2", "keep2.raw");
            assertThat(Files.mismatch(dir.resolve("keep.raw"), dir.resolve("keep2.raw"))).as("snapshot untouched").isEqualTo(-1);
            Qemu.img(dir, "snapshot", "-d", "keep", "t.qcow2");
            assertCheckClean(dir, "t.qcow2");
        }
    }

    /**
     * Sources that are not in the page cache (written by qemu-img and qemu-io with -t none, that is O_DIRECT) convert
     * to the same bytes, and convert reads their bulk around the cache: their pages are not left cached afterwards.
     * 64 KiB clusters in order; 4 KiB clusters between L2 tables, zero clusters and later writes placed at the end of
     * the file out of guest order, which gathered reads must skip, fill or leave to the plain path.
     */
    @ParameterizedTest
    @ValueSource(strings = {"65536", "4096"})
    void convertOfAnUncachedSourceMatchesAndLeavesItUncached(String clusterSize) throws Exception {
        String raw = p("u.raw");
        try (RandomAccessFile f = new RandomAccessFile(raw, "rw")) {
            f.setLength(64L << 20);
            byte[] b = new byte[12 << 20];
            new Random(9).nextBytes(b);
            for (int i = 0; i < b.length; i += 64 << 10) {
                java.util.Arrays.fill(b, i + (16 << 10), i + (24 << 10), (byte) 0); // zero clusters inside the data
            }
            f.seek(3 << 20);
            f.write(b);
            f.seek((40L << 20) + 4096 * 3 + 17); // an unaligned stretch
            f.write(b, 0, 5 << 20);
        }
        Qemu.Result made = Qemu.imgRaw(dir, "convert", "-t", "none", "-O", "qcow2", "-o", "cluster_size=" + clusterSize,
                raw, "u.qcow2");
        org.junit.jupiter.api.Assumptions.assumeTrue(made.exit() == 0, "the temp file system refuses O_DIRECT: " + made);
        // Later writes into zero clusters: allocated at the end of the file, out of guest order.
        List<String> later = new java.util.ArrayList<>();
        for (long off = (12L << 20) + (16 << 10); off > 3 << 20; off -= 1 << 20) {
            later.add("write -P 0x" + Integer.toHexString((int) (off >> 20) + 16) + " " + off + " 8k");
        }
        Qemu.io(dir, "none", "qcow2", p("u.qcow2"), later);
        Qemu.img(dir, "convert", "-O", "raw", "u.qcow2", "expected.raw");
        PageCache.evict(dir.resolve("u.qcow2")); // qemu-img read it just now
        long fileBytes = Files.size(dir.resolve("u.qcow2"));
        try (org.qdedup.io.NativeFs.Fd probe = org.qdedup.io.NativeFs.open(dir.resolve("u.qcow2"), false)) {
            org.junit.jupiter.api.Assumptions.assumeTrue(probe != null && probe.cachedPages(0, fileBytes) >= 0,
                    "cachestat(2) needs Linux 6.5");
            assertThat(probe.cachedPages(0, fileBytes) * 4096).as("source bytes cached before").isLessThan(fileBytes / 8);
        }
        cli("convert", "-O", "raw", p("u.qcow2"), p("u-out.raw")).ok();
        try (org.qdedup.io.NativeFs.Fd probe = org.qdedup.io.NativeFs.open(dir.resolve("u.qcow2"), false)) {
            assertThat(probe.cachedPages(0, fileBytes) * 4096).as("source bytes cached after convert")
                    .isLessThan(fileBytes / 4);
        }
        assertThat(Files.mismatch(dir.resolve("expected.raw"), dir.resolve("u-out.raw"))).isEqualTo(-1);
        assertThat(Qemu.imgRaw(dir, "compare", "-f", "qcow2", "-F", "raw", "u.qcow2", "u-out.raw").exit()).isZero();
    }

    @Test
    void convertOptionsAndCacheModes() throws Exception {
        String raw = p("r.raw");
        try (RandomAccessFile f = new RandomAccessFile(raw, "rw")) {
            f.setLength(4L << 20);
            // over 256 KiB of data: with -t none and directsync most of it is written with O_DIRECT
            byte[] b = new byte[(1 << 20) + 50_000];
            new Random(5).nextBytes(b);
            f.seek((1 << 20) + 512);
            f.write(b);
        }
        for (String cache : new String[]{"writeback", "writethrough", "none", "directsync", "unsafe"}) {
            String dst = p("wb-" + cache + ".qcow2");
            Run r = cli("convert", "-t", cache, "-p", "-O", "qcow2", raw, dst).ok();
            assertThat(r.out()).as("progress goes to stderr only").isEmpty();
            assertCheckClean(dir, dst);
            assertThat(Qemu.imgRaw(dir, "compare", "-f", "raw", "-F", "qcow2", raw, dst).exit()).isZero();
            String rawDst = p("wb-" + cache + ".raw");
            cli("convert", "-t", cache, "-O", "raw", dst, rawDst).ok();
            assertThat(Files.mismatch(Path.of(raw), Path.of(rawDst))).isEqualTo(-1);
        }
        // -n into the image just made, with -t writeback.
        Qemu.io(dir, "qcow2", p("wb-unsafe.qcow2"), List.of("write -P 0x99 0 4M"));
        cli("convert", "-n", "-t", "writeback", "-O", "qcow2", raw, p("wb-unsafe.qcow2")).ok();
        assertCheckClean(dir, p("wb-unsafe.qcow2"));
        assertThat(Qemu.imgRaw(dir, "compare", "-f", "raw", "-F", "qcow2", raw, p("wb-unsafe.qcow2")).exit()).isZero();
        // Errors: one line, exit 1.
        cli("convert", "-n", "-o", "cluster_size=4k", "-O", "qcow2", raw, p("wb-unsafe.qcow2")).failsWithOneLine();
        cli("convert", "-t", "bogus", "-O", "qcow2", raw, p("x.qcow2")).failsWithOneLine();
        cli("convert", "-O", "qcow2", "-o", "cluster_size=1000", raw, p("y.qcow2")).failsWithOneLine();
        assertThat(dir.resolve("y.qcow2")).doesNotExist();
        cli("convert", "-O", "qcow2", "-o", "compat=0.10,refcount_bits=8", raw, p("z.qcow2")).failsWithOneLine();
        assertThat(dir.resolve("z.qcow2")).doesNotExist();
        cli("convert", "-n", "-O", "qcow2", raw, p("missing.qcow2")).failsWithOneLine();
    }
}
