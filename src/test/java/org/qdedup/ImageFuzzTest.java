package org.qdedup;

import static org.assertj.core.api.Assertions.assertThat;

import java.io.IOException;
import java.io.InputStream;
import java.nio.ByteBuffer;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.attribute.FileTime;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Map;
import java.util.Random;
import java.util.TreeMap;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Tag;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;
import org.qdedup.cli.Main;
import org.qdedup.dedup.DedupSidecar;
import org.qdedup.format.FormatException;
import org.qdedup.image.BlockDevice;
import org.qdedup.image.Images;
import org.qdedup.image.OpenOptions;
import org.qdedup.image.Qcow2Image;

/**
 * Hostile images: seeds made by qemu-img / qemu-io (and qdedup for dedup) get structure-aware mutations
 * ({@link ImageMutator}); each input goes through the library (read-only open and reads, read-write open and a write)
 * and the CLI (info, map, check, snapshot -l, convert -O raw). Every path must end in success or our one-line
 * error: no other exception, no hang, no OutOfMemoryError (this class runs in a JVM of 256 MiB, see pom.xml), and
 * the file keeps its bytes and mtime unless a read-write open succeeded. Every {@code compareEvery}-th input that
 * both qemu-img and we read is converted by both and must be byte for byte the same.
 *
 * <p>By hand: {@code -Dqdedup.fuzz.images=N -Dqdedup.seed=S} (and {@code -Dqdedup.fuzz.compareEvery=N},
 * {@code -Dqdedup.fuzz.only=I} to replay input I). Failing inputs are saved under {@code target/image-fuzz-failures}.
 */
@Tag("small-heap")
class ImageFuzzTest {
    static final int IMAGES = Integer.getInteger("qdedup.fuzz.images", 1200);
    static final int COMPARE_EVERY = Integer.getInteger("qdedup.fuzz.compareEvery", 50);
    static final int ONLY = Integer.getInteger("qdedup.fuzz.only", -1);
    static final long PER_INPUT_SECONDS = 60;
    /** Converted images are compared with qemu-img's up to this virtual size. */
    static final long COMPARE_MAX_SIZE = 256L << 20;

    @TempDir
    static Path dir;

    static final List<ImageMutator.Seed> SEEDS = new ArrayList<>();
    /** Files beside the inputs (backing files, loop partner, data file) and their bytes, to prove or restore them. */
    static final Map<String, byte[]> AUX = new TreeMap<>();
    static byte[] dedupIndexFile;

    private final Map<String, Long> counts = new TreeMap<>();
    private final List<String> failures = new ArrayList<>();

    @BeforeAll
    static void seeds() throws Exception {
        seed("v3-64k", "-o", "cluster_size=64k", "1G", "write -P 0x11 0 128k", "write -z 256k 64k", "write -P 0x22 512M 64k",
                "write -P 0x23 1023M 4k");
        seed("v2-512", "-o", "compat=0.10,cluster_size=512", "4M", "write -P 0x31 0 64k", "write -P 0x32 1M 4k",
                "write -P 0x33 3M 1536");
        seed("4k-refcount1", "-o", "cluster_size=4k,refcount_bits=1", "8M", "write -P 0x41 0 256k", "write -z 1M 16k",
                "write -P 0x42 4M 8k");
        seed("4k-refcount64-lazy", "-o", "cluster_size=4k,refcount_bits=64,lazy_refcounts=on", "8M", "write -P 0x43 0 64k",
                "write -P 0x44 6M 64k");
        seed("16k-refcount4", "-o", "cluster_size=16k,refcount_bits=4", "8M", "write -P 0x45 0 64k", "write -P 0x46 5M 32k");
        seed("zlib", "-o", "cluster_size=64k", "16M", "write -c -P 0x51 0 64k", "write -c -P 0x52 1M 128k",
                "write -P 0x53 2M 64k");
        seed("zstd", "-o", "cluster_size=64k,compression_type=zstd", "16M", "write -c -P 0x54 0 64k",
                "write -c -P 0x55 3M 64k", "write -P 0x56 4M 64k");
        seed("4k-zlib", "-o", "cluster_size=4k", "4M", "write -c -P 0x57 0 64k", "write -P 0x58 1M 8k");
        seed("extl2", "-o", "cluster_size=64k,extended_l2=on", "16M", "write -P 0x61 0 4k", "write -P 0x62 64k 64k",
                "write -z 200k 2k", "write -P 0x63 8M 6k");
        // Snapshots: two of them, the second with a long name, data changed between them.
        Qemu.img(dir, "create", "-f", "qcow2", "snap.qcow2", "64M");
        Qemu.io(dir, "qcow2", "snap.qcow2", List.of("write -P 0x71 0 256k", "write -P 0x72 32M 64k"));
        Qemu.img(dir, "snapshot", "-c", "first", "snap.qcow2");
        Qemu.io(dir, "qcow2", "snap.qcow2", List.of("write -P 0x73 64k 64k", "write -z 32M 64k"));
        Qemu.img(dir, "snapshot", "-c", "second-" + "n".repeat(100), "snap.qcow2");
        Qemu.io(dir, "qcow2", "snap.qcow2", List.of("write -P 0x74 128k 64k"));
        add("snap", "snap.qcow2");
        // Backing chains: qcow2 with a backing format extension, raw without one; a partner that closes a loop.
        Qemu.img(dir, "create", "-f", "qcow2", "base.qcow2", "8M");
        Qemu.io(dir, "qcow2", "base.qcow2", List.of("write -P 0x81 0 4M"));
        Qemu.img(dir, "create", "-f", "raw", "base.raw", "8M");
        Qemu.io(dir, "raw", "base.raw", List.of("write -P 0x82 1M 2M"));
        Qemu.img(dir, "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "-o", "cluster_size=4k", "overlay.qcow2", "8M");
        Qemu.io(dir, "qcow2", "overlay.qcow2", List.of("write -P 0x83 1M 64k", "write -z 2M 64k"));
        add("backing-qcow2", "overlay.qcow2");
        Qemu.img(dir, "create", "-f", "qcow2", "-o", "compat=0.10", "-b", "base.raw", "-F", "raw", "overlay2.qcow2", "12M");
        Qemu.io(dir, "qcow2", "overlay2.qcow2", List.of("write -P 0x84 1536k 64k"));
        add("backing-raw-v2", "overlay2.qcow2");
        Qemu.img(dir, "create", "-f", "qcow2", "-u", "-b", "fuzz.qcow2", "-F", "qcow2", "loop.qcow2", "8M");
        // An external data file (its name in the data file extension, relative to the image).
        Qemu.img(dir, "create", "-f", "qcow2", "-o", "data_file=data.raw,cluster_size=4k", "ext.qcow2", "4M");
        Qemu.io(dir, "qcow2", "ext.qcow2", List.of("write -P 0x91 0 64k", "write -P 0x92 2M 4k"));
        add("data-file", "ext.qcow2");
        // Dedup: our header extension and autoclear bit, an index file in sync beside it.
        assertThat(FormatMatrixTest.cli("create", "--dedup", dir.resolve("dd.qcow2").toString(), "8M").rc()).isZero();
        try (Qcow2Image q = Images.openWritable(dir.resolve("dd.qcow2").toString(), OpenOptions.defaults())) {
            byte[] c = new byte[4096];
            for (int i = 0; i < 24; i++) {
                Arrays.fill(c, (byte) (0xa0 + i % 5));
                q.write(ByteBuffer.wrap(c), (long) i * 3 * 4096);
            }
        }
        dedupIndexFile = Files.readAllBytes(DedupSidecar.pathFor(dir.resolve("dd.qcow2")));
        add("dedup", "dd.qcow2");
        for (String aux : List.of("base.qcow2", "base.raw", "loop.qcow2", "data.raw")) {
            AUX.put(aux, Files.readAllBytes(dir.resolve(aux)));
        }
    }

    private static void seed(String name, String o, String opts, String size, String... io) throws Exception {
        String file = name + ".qcow2";
        Qemu.img(dir, "create", "-f", "qcow2", o, opts, file, size);
        Qemu.io(dir, "qcow2", file, List.of(io));
        add(name, file);
    }

    private static void add(String name, String file) throws Exception {
        SEEDS.add(new ImageMutator.Seed(name, Files.readAllBytes(dir.resolve(file))));
    }

    @Test
    void mutatedImagesEndInATypedErrorOrACorrectRead() throws Exception {
        assertThat(Runtime.getRuntime().maxMemory()).as("runs with a small heap (-Xmx256m, the small-heap execution)")
                .isLessThan(400L << 20);
        long seed = WriterModelTest.SEED;
        long t0 = System.nanoTime();
        ExecutorService worker = Executors.newSingleThreadExecutor(r -> Thread.ofPlatform().daemon().name("fuzz").unstarted(r));
        try {
            for (int i = ONLY >= 0 ? ONLY : 0; i < (ONLY >= 0 ? ONLY + 1 : IMAGES); i++) {
                Random r = new Random(seed * 1_000_003L + i);
                ImageMutator.Seed s = SEEDS.get(r.nextInt(SEEDS.size()));
                ImageMutator.Mutant m = ImageMutator.mutate(s, r);
                long pick = r.nextLong();
                int index = i;
                Future<?> f = worker.submit(() -> {
                    one(index, s, m, new Random(pick));
                    return null;
                });
                try {
                    f.get(PER_INPUT_SECONDS, TimeUnit.SECONDS);
                } catch (TimeoutException e) {
                    String where = save(i, s, m);
                    StringBuilder st = new StringBuilder();
                    Thread.getAllStackTraces().forEach((t, trace) -> {
                        if (t.getName().equals("fuzz")) {
                            for (StackTraceElement el : trace) {
                                st.append("\n\tat ").append(el);
                            }
                        }
                    });
                    throw new AssertionError("input " + i + " (" + s.name + ", " + m.log() + ") hung for " + PER_INPUT_SECONDS
                            + " s, saved as " + where + st);
                } catch (java.util.concurrent.ExecutionException e) {
                    failures.add("input " + i + " (" + s.name + ", " + m.log() + "): harness error " + e.getCause());
                    save(i, s, m);
                }
                if (IMAGES >= 10_000 && i % 5000 == 0 && i > 0) {
                    System.out.printf("image fuzz: %d inputs, %.0f s, %s%n", i, (System.nanoTime() - t0) / 1e9, counts);
                }
            }
        } finally {
            worker.shutdownNow();
        }
        for (Map.Entry<String, byte[]> a : AUX.entrySet()) {
            if (!a.getKey().equals("data.raw")) {
                assertThat(Files.readAllBytes(dir.resolve(a.getKey()))).as("%s unchanged", a.getKey()).isEqualTo(a.getValue());
            }
        }
        System.out.printf("image fuzz (seed %d): %d inputs in %.0f s: %s%n", seed, ONLY >= 0 ? 1 : IMAGES,
                (System.nanoTime() - t0) / 1e9, counts);
        assertThat(failures).as("inputs that broke a rule (saved under target/image-fuzz-failures)").isEmpty();
    }

    /** All the paths one input goes through, and the rules each must keep. */
    private void one(int i, ImageMutator.Seed s, ImageMutator.Mutant m, Random r) throws Exception {
        Path img = dir.resolve("fuzz.qcow2");
        String f = img.toString();
        Files.write(img, m.bytes());
        Path index = DedupSidecar.pathFor(img);
        Files.deleteIfExists(index);
        if (s.name.equals("dedup")) {
            Files.write(index, dedupIndexFile); // not in sync with the copy (new inode): must be rebuilt, not trusted
        }
        Files.write(dir.resolve("data.raw"), AUX.get("data.raw"));
        Path out = dir.resolve("out.raw");
        Files.deleteIfExists(out);
        FileSnap before = FileSnap.of(img);
        List<String> broken = new ArrayList<>();

        // Library, read-only: open, read the start and a random range.
        long size = -1;
        try (BlockDevice d = Images.open(f, OpenOptions.defaults())) {
            size = d.size();
            ByteBuffer b = ByteBuffer.allocate((int) Math.min(size, 256 << 10));
            d.read(b, 0);
            if (size > 0) {
                long at = Math.floorMod(r.nextLong(), size);
                d.read(ByteBuffer.allocate((int) Math.min(size - at, 64 << 10)), at);
            }
            count("open: ok");
        } catch (IOException e) {
            count(e instanceof FormatException ? "open: FormatException" : "open: IOException");
            if (e.getMessage() == null || e.getMessage().contains("\n")) {
                broken.add("library open: message not one line: " + e);
            }
        } catch (RuntimeException | Error e) {
            broken.add("library open/read: " + describe(e));
        }

        // CLI, read-only paths.
        FormatMatrixTest.Run info = cli("info", f);
        oneLineOrSuccess(broken, info);
        oneLineOrSuccess(broken, cli("info", "--output=json", f));
        oneLineOrSuccess(broken, cli("map", "--output=json", f));
        oneLineOrSuccess(broken, cli("snapshot", "-l", f));
        FormatMatrixTest.Run check = cli("check", f);
        // 63: probed as raw (the magic is gone), which has no checks.
        if (check.rc() < 0 || check.rc() > 3 && check.rc() != 63 || crashed(check.err())) {
            broken.add("check: exit " + check.rc() + ": " + firstLines(check.err()));
        }
        FormatMatrixTest.Run conv = cli("convert", "-O", "raw", f, out.toString());
        oneLineOrSuccess(broken, conv);
        if (!before.equals(FileSnap.of(img))) {
            broken.add("a read-only command changed the image");
        }

        // The oracle: qemu-img's reading of the same bytes.
        if (i % COMPARE_EVERY == 0) {
            compareWithQemu(broken, img, out, conv, size, "input " + i + " (" + s.name + ", " + m.log() + ")");
        }

        // Library, read-write: open, write a cluster, read it back. A failed open leaves the file as it was.
        boolean opened = false;
        boolean repaired = false;
        try (Qcow2Image q = Images.openWritable(f, OpenOptions.defaults())) {
            opened = true;
            if (q.size() > 0) {
                long cs = q.geometry().clusterSize();
                long at = Math.floorMod(r.nextLong(), q.size()) / cs * cs;
                int len = (int) Math.min(cs, q.size() - at);
                byte[] data = new byte[len];
                Arrays.fill(data, (byte) 0x5a);
                q.write(ByteBuffer.wrap(data), at);
                q.flush();
                ByteBuffer back = ByteBuffer.allocate(len);
                q.read(back, at);
                if (Arrays.equals(back.array(), data)) {
                    count("write: ok");
                } else {
                    // A write QEMU would stop by its overlap checks (data over metadata) in a damaged image: listed.
                    count("write: read back differs");
                    note("input " + i + " (" + s.name + ", " + m.log() + "): cluster written at " + at + " reads back differently -> "
                            + save(i, s, m));
                }
            }
        } catch (IOException e) {
            count(opened ? "write: error after open" : "write: open refused");
            // The one refusal allowed to have written: a dirty image that passed validation, whose repair failed.
            repaired = !opened && e.getMessage() != null && e.getMessage().contains("its repair failed");
            if (e.getMessage() == null || e.getMessage().contains("\n")) {
                broken.add("library write: message not one line: " + e);
            }
        } catch (RuntimeException | Error e) {
            broken.add("library write: " + describe(e));
        }
        if (!opened && !repaired && !before.equals(FileSnap.of(img))) {
            broken.add("read-write open failed but the image changed");
        }
        if (!broken.isEmpty()) {
            failures.add("input " + i + " (" + s.name + ", " + m.log() + "): " + broken + " -> " + save(i, s, m));
        }
    }

    private void compareWithQemu(List<String> broken, Path img, Path ours, FormatMatrixTest.Run conv, long size, String what)
            throws IOException {
        Path theirs = dir.resolve("qemu.raw");
        Files.deleteIfExists(theirs);
        // qemu-img itself can spin (a backing loop through another image, seen here): 20 s, then it counts as refusing.
        Qemu.Result q = Qemu.exec(dir, List.of("timeout", "20", "qemu-img", "convert", "-O", "raw", img.getFileName().toString(),
                theirs.getFileName().toString()));
        if (q.exit() == 124) {
            count("qemu-img: timed out");
        }
        boolean qemuReads = q.exit() == 0;
        boolean weRead = conv.rc() == 0;
        count("qemu-img: " + (weRead ? "we read, " : "we refuse, ") + (qemuReads ? "it reads" : "it refuses"));
        if (weRead != qemuReads) {
            // Not a failure (we are stricter in places, QEMU in others): listed for review.
            note(what + "\n  ours: " + conv.err().strip() + "\n  qemu: " + q.err().strip());
        }
        if (weRead && qemuReads && size <= COMPARE_MAX_SIZE) {
            long diff = firstDifference(ours, theirs);
            if (diff >= 0) {
                broken.add("convert -O raw differs from qemu-img's at byte " + diff);
            }
            count("qemu-img: compared");
        }
        Files.deleteIfExists(theirs);
    }

    /** Appends a line to {@code target/image-fuzz-differences.txt}: what is not a failure but worth a look. */
    private static void note(String line) throws IOException {
        Path d = Files.createDirectories(Path.of("target"));
        Files.writeString(d.resolve("image-fuzz-differences.txt"), line + "\n", java.nio.file.StandardOpenOption.CREATE,
                java.nio.file.StandardOpenOption.APPEND);
    }

    /** First offset where two files differ (a shorter file differs at its end), or -1. */
    static long firstDifference(Path a, Path b) throws IOException {
        try (InputStream x = Files.newInputStream(a); InputStream y = Files.newInputStream(b)) {
            byte[] bx = new byte[1 << 20], by = new byte[1 << 20];
            long pos = 0;
            for (;;) {
                int nx = x.readNBytes(bx, 0, bx.length), ny = y.readNBytes(by, 0, by.length);
                int mismatch = Arrays.mismatch(bx, 0, nx, by, 0, ny);
                if (mismatch >= 0) {
                    return pos + mismatch;
                }
                if (nx == 0) {
                    return -1;
                }
                pos += nx;
            }
        }
    }

    // ---------------------------------------------------------------- rules

    private static FormatMatrixTest.Run cli(String... args) {
        return FormatMatrixTest.cli(args);
    }

    /** Exit 0 and nothing on stderr, or exit 1 and one line "qdedup: ..." that is ours. */
    private void oneLineOrSuccess(List<String> broken, FormatMatrixTest.Run c) {
        String what = c.args().get(0) + (c.args().size() > 2 ? " " + c.args().get(1) : "");
        count(what + ": " + (c.rc() == 0 ? "ok" : "error"));
        if (c.rc() == 0 && c.err().isEmpty()) {
            return;
        }
        boolean oneLine = c.rc() == 1 && c.err().startsWith("qdedup: ") && c.err().indexOf('\n') == c.err().length() - 1;
        if (!oneLine || crashed(c.err())) {
            broken.add(what + ": exit " + c.rc() + ": " + firstLines(c.err()) + trace(c));
        }
    }

    /** What only an escaped exception, an OutOfMemoryError or a stack trace prints. */
    private static boolean crashed(String err) {
        return err.contains("internal error") || err.contains("out of memory") || err.contains("Exception")
                || err.contains("\tat ");
    }

    /** The stack trace of an escaped exception (the CLI prints one line), for the report. */
    private static String trace(FormatMatrixTest.Run c) {
        Throwable t = Main.lastInternalError();
        if (!c.err().contains("internal error") || t == null) {
            return "";
        }
        java.io.StringWriter w = new java.io.StringWriter();
        t.printStackTrace(new java.io.PrintWriter(w));
        return " | trace: " + w.toString().replace("\n", " | ");
    }

    /** The first line, or all of it with a stack trace (QDEDUP_DEBUG=1 in the environment makes the CLI print them). */
    private static String firstLines(String s) {
        return s.contains("\tat ") ? s.replace("\n", " | ") : s.split("\n", 2)[0];
    }

    private static String describe(Throwable e) {
        StackTraceElement[] st = e.getStackTrace();
        return e + (st.length > 0 ? " at " + st[0] + (st.length > 1 ? " < " + st[1] : "") : "");
    }

    private void count(String what) {
        counts.merge(what, 1L, Long::sum);
    }

    /** Saves a failing input for replay ({@code -Dqdedup.fuzz.only=I} remakes it from the seed too). */
    private static String save(int i, ImageMutator.Seed s, ImageMutator.Mutant m) {
        try {
            Path d = Path.of("target", "image-fuzz-failures");
            Files.createDirectories(d);
            Path p = d.resolve(i + "-" + s.name + ".qcow2");
            Files.write(p, m.bytes());
            return p.toString();
        } catch (IOException e) {
            return "(not saved: " + e + ")";
        }
    }

    /** Bytes (hash), size and mtime of a file. */
    private record FileSnap(int hash, long size, FileTime mtime) {
        static FileSnap of(Path p) throws IOException {
            byte[] b = Files.readAllBytes(p);
            return new FileSnap(Arrays.hashCode(b), b.length, Files.getLastModifiedTime(p));
        }
    }
}
