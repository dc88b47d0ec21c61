package org.qdedup;

import static org.assertj.core.api.Assertions.assertThat;
import static org.assertj.core.api.Assertions.assertThatThrownBy;

import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.io.RandomAccessFile;
import java.nio.ByteBuffer;
import java.nio.channels.ClosedChannelException;
import java.nio.channels.NonWritableChannelException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Random;
import java.util.concurrent.TimeUnit;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.CsvSource;
import org.junit.jupiter.params.provider.ValueSource;
import org.qdedup.format.Be;
import org.qdedup.image.BlockDevice;
import org.qdedup.image.CreateOptions;
import org.qdedup.image.DeviceChannel;
import org.qdedup.image.Images;
import org.qdedup.image.OpenOptions;
import org.qdedup.image.Qcow2Create;
import org.qdedup.image.Qcow2Image;

/**
 * Writer behaviour that QEMU can see: image locking against qemu-nbd / qemu-io / qemu-img, feature bits and
 * unknown header extensions across our first write, the metadata overlap guard, discard giving space back to the
 * host, writes into QEMU-made images whose clusters are shared with internal snapshots, and the channel adapter.
 */
class WriterFeaturesTest {
    @TempDir
    Path dir;

    // ---- helpers --------------------------------------------------------------------------------------------

    private String path(String name) {
        return dir.resolve(name).toString();
    }

    private static byte[] readAt(String file, long off, int len) throws IOException {
        byte[] b = new byte[len];
        try (RandomAccessFile f = new RandomAccessFile(file, "r")) {
            f.seek(off);
            f.readFully(b);
        }
        return b;
    }

    private static void writeAt(String file, long off, byte[] b) throws IOException {
        try (RandomAccessFile f = new RandomAccessFile(file, "rw")) {
            f.seek(off);
            f.write(b);
        }
    }

    private static long u64At(String file, long off) throws IOException {
        return Be.u64(readAt(file, off, 8), 0);
    }

    private static void put64At(String file, long off, long v) throws IOException {
        byte[] b = new byte[8];
        Be.put64(b, 0, v);
        writeAt(file, off, b);
    }

    private void assertCheckClean(String img) {
        Qemu.Result r = Qemu.imgRaw(dir, "check", img);
        assertThat(r.exit()).as("qemu-img check %s exit (0 clean, 2 corrupt, 3 leaks):%n%s%s", img, r.out(), r.err()).isZero();
    }

    private static void assertOneLine(String msg) {
        assertThat(msg).as("one line").isNotBlank().doesNotContain("\n").doesNotContain("\tat ");
    }

    /** A qemu-nbd serving {@code img} read-write on a unix socket, until closed (also used by CliWriteTest). */
    static final class Nbd implements AutoCloseable {
        final Process p;

        Nbd(Path dir, String img) throws Exception {
            Path sock = dir.resolve("nbd-" + System.nanoTime() + ".sock");
            Path err = dir.resolve("nbd-" + System.nanoTime() + ".err");
            ProcessBuilder pb = new ProcessBuilder("qemu-nbd", "-t", "-f", "qcow2", "--socket=" + sock, img);
            pb.redirectOutput(ProcessBuilder.Redirect.DISCARD).redirectError(err.toFile());
            p = pb.start();
            long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(15);
            while (!Files.exists(sock)) {
                if (!p.isAlive()) {
                    throw new AssertionError("qemu-nbd exited " + p.exitValue() + ": " + Files.readString(err));
                }
                if (System.nanoTime() > deadline) {
                    p.destroyForcibly();
                    throw new AssertionError("qemu-nbd did not create its socket");
                }
                Thread.sleep(20);
            }
        }

        @Override
        public void close() throws Exception {
            p.destroy();
            if (!p.waitFor(10, TimeUnit.SECONDS)) {
                p.destroyForcibly().waitFor();
            }
        }
    }

    /** An interactive qemu-io holding {@code img} open (read-write unless {@code readOnly}), until closed. */
    private static final class QemuIo implements AutoCloseable {
        final Process p;
        final OutputStream in;

        QemuIo(String img, boolean readOnly) throws Exception {
            List<String> cmd = new ArrayList<>(List.of("qemu-io", "-f", "qcow2"));
            if (readOnly) {
                cmd.add("-r");
            }
            cmd.add(img);
            p = new ProcessBuilder(cmd).redirectErrorStream(true).start();
            in = p.getOutputStream();
            // "length" is answered only once the image is open (and locked).
            in.write("length\n".getBytes(StandardCharsets.US_ASCII));
            in.flush();
            InputStream out = p.getInputStream();
            StringBuilder seen = new StringBuilder();
            long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(15);
            while (!seen.toString().contains("MiB")) {
                int c = out.read();
                if (c < 0 || System.nanoTime() > deadline) {
                    p.destroyForcibly();
                    throw new AssertionError("qemu-io did not open the image: " + seen);
                }
                seen.append((char) c);
            }
        }

        @Override
        public void close() throws Exception {
            try {
                in.write("quit\n".getBytes(StandardCharsets.US_ASCII));
                in.close();
            } catch (IOException ignored) {
                // already gone
            }
            if (!p.waitFor(10, TimeUnit.SECONDS)) {
                p.destroyForcibly().waitFor();
            }
        }
    }

    private String qemuImage(String name, String opts, String size) {
        Qemu.img(dir, "create", "-f", "qcow2", "-o", opts, name, size);
        return path(name);
    }

    // ---- 1. locking -----------------------------------------------------------------------------------------

    @Test
    void openWritableIsRefusedWhileQemuNbdServesTheImage() throws Exception {
        String img = qemuImage("nbd.qcow2", "cluster_size=65536", "16M");
        try (Nbd nbd = new Nbd(dir, img)) {
            assertThat(Qemu.imgRaw(dir, "info", img).exit()).as("sanity: qemu-nbd holds the write lock").isNotZero();
            assertThatThrownBy(() -> Images.openWritable(img, OpenOptions.defaults()).close())
                    .isInstanceOf(IOException.class)
                    .satisfies(e -> {
                        assertOneLine(e.getMessage());
                        assertThat(e.getMessage()).startsWith(img + ":").contains("in use");
                    });
            // A read-only open is refused too (as qemu-img info is): qemu-nbd holds the write permission, which
            // readers do not share.
            assertThatThrownBy(() -> Images.open(img, OpenOptions.defaults()).close()).isInstanceOf(IOException.class);
            // -U reads without locking.
            try (BlockDevice d = Images.open(img, new OpenOptions(null, true, null))) {
                assertThat(d.size()).isEqualTo(16L << 20);
            }
        }
        // The refused opens left nothing locked behind in this process.
        try (Qcow2Image q = Images.openWritable(img, OpenOptions.defaults())) {
            q.write(ByteBuffer.wrap(new byte[]{1, 2, 3}), 0);
        }
        assertCheckClean(img);
    }

    @Test
    void openWritableIsRefusedWhileQemuIoHoldsTheImage() throws Exception {
        String img = qemuImage("io.qcow2", "cluster_size=65536", "16M");
        byte[] before = Files.readAllBytes(Path.of(img));
        try (QemuIo io = new QemuIo(img, false)) {
            assertThatThrownBy(() -> Images.openWritable(img, OpenOptions.defaults()).close())
                    .isInstanceOf(IOException.class)
                    .satisfies(e -> {
                        assertOneLine(e.getMessage());
                        assertThat(e.getMessage()).startsWith(img + ":").contains("in use");
                    });
        }
        assertThat(Files.readAllBytes(Path.of(img))).as("the refused open changed nothing").isEqualTo(before);
        // A read-only qemu-io blocks our writer as well (it does not share the write permission).
        try (QemuIo io = new QemuIo(img, true)) {
            assertThatThrownBy(() -> Images.openWritable(img, OpenOptions.defaults()).close()).isInstanceOf(IOException.class);
            try (BlockDevice d = Images.open(img, OpenOptions.defaults())) {
                assertThat(d.size()).as("two readers share").isEqualTo(16L << 20);
            }
        }
    }

    @Test
    void qemuIsLockedOutWhileWeWriteAndSharesWhileWeRead() throws Exception {
        String img = qemuImage("we.qcow2", "cluster_size=65536", "16M");
        try (Qcow2Image q = Images.openWritable(img, OpenOptions.defaults())) {
            byte[] data = new byte[100_000];
            Arrays.fill(data, (byte) 0x3c);
            q.write(ByteBuffer.wrap(data), 12345);
            q.flush();
            Qemu.Result info = Qemu.imgRaw(dir, "info", img);
            assertThat(info.exit()).as("qemu-img info without -U while we write").isNotZero();
            assertThat(info.err()).contains("lock");
            Qemu.Result w = Qemu.exec(dir, List.of("qemu-io", "-f", "qcow2", "-c", "write 0 4k", img));
            assertThat(w.exit()).as("qemu-io write while we write: %s%s", w.out(), w.err()).isNotZero();
            assertThat(w.out() + w.err()).contains("lock").doesNotContain("wrote");
            Qemu.Result infoU = Qemu.imgRaw(dir, "info", "-U", "--output=json", img);
            assertThat(infoU.exit()).as("qemu-img info -U: %s", infoU.err()).isZero();
            assertThat(Json.at(Json.parse(infoU.out()), "virtual-size").toString()).isEqualTo(Long.toString(16L << 20));
            Qemu.Result checkU = Qemu.imgRaw(dir, "check", "-U", img);
            assertThat(checkU.exit()).as("qemu-img check -U after our flush: %s%s", checkU.out(), checkU.err()).isZero();
        }
        // Our read-only open: QEMU may read alongside, but not write.
        try (BlockDevice d = Images.open(img, OpenOptions.defaults())) {
            Qemu.Result w = Qemu.exec(dir, List.of("qemu-io", "-f", "qcow2", "-c", "write 0 4k", img));
            assertThat(w.exit()).as("qemu-io write while we read: %s%s", w.out(), w.err()).isNotZero();
            assertThat(w.out() + w.err()).contains("lock").doesNotContain("wrote");
            assertThat(Qemu.imgRaw(dir, "info", img).exit()).as("qemu-img info while we read").isZero();
            Qemu.Result r = Qemu.exec(dir, List.of("qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0x3c 12345 100000", img));
            assertThat(r.exit()).as("qemu-io -r read while we read: %s%s", r.out(), r.err()).isZero();
            assertThat(r.out()).doesNotContain("fail");
        }
        // Released: QEMU writes again.
        Qemu.io(dir, "qcow2", img, List.of("write -P 0x01 0 4k"));
        assertCheckClean(img);
    }

    // ---- 2. feature bits and unknown header extensions --------------------------------------------------------

    /** Inserts an extension of type 0x12345678 with 16 data bytes before the end marker; returns its offset. */
    private static int addUnknownExtension(String img) throws IOException {
        byte[] h = readAt(img, 0, 4096);
        int pos = (int) Be.u32(h, 100);
        while (Be.u32(h, pos) != 0) {
            pos += 8 + (int) ((Be.u32(h, pos + 4) + 7) & ~7L);
        }
        assertThat(Be.u64(h, 8)).as("no backing file name after the extensions").isZero();
        byte[] ext = new byte[24 + 8];
        Be.put32(ext, 0, 0x12345678);
        Be.put32(ext, 4, 16);
        for (int i = 0; i < 16; i++) {
            ext[8 + i] = (byte) (0xa0 + i);
        }
        writeAt(img, pos, ext); // extension, then a fresh end marker
        return pos;
    }

    @ParameterizedTest(name = "{0}")
    @ValueSource(strings = {"plain", "data-file-raw"})
    void firstWriteClearsUnknownAndBitmapAutoclearBitsAndKeepsEverythingElse(String variant) throws Exception {
        boolean df = variant.equals("data-file-raw");
        String img = qemuImage("f.qcow2", "cluster_size=65536,lazy_refcounts=on"
                + (df ? ",data_file=f.data,data_file_raw=on" : ""), "8M");
        long autoclear = u64At(img, 88);
        assertThat(autoclear).isEqualTo(df ? 2 : 0);
        put64At(img, 88, autoclear | 1 | (1L << 5));
        int extAt = addUnknownExtension(img);
        byte[] before = readAt(img, 0, 65536);

        try (Qcow2Image q = Images.openWritable(img, OpenOptions.defaults())) {
            assertThat(u64At(img, 88)).as("opening alone changes nothing").isEqualTo(autoclear | 0x21);
            byte[] data = new byte[70000];
            Arrays.fill(data, (byte) 0x5e);
            q.write(ByteBuffer.wrap(data), 4096);
            assertThat(u64At(img, 88)).as("autoclear bits after the first write (before flush)").isEqualTo(autoclear);
        }
        byte[] after = readAt(img, 0, 65536);
        assertThat(Be.u64(after, 88)).as("autoclear: bitmaps (0) and unknown (5) cleared, raw data (1) kept")
                .isEqualTo(df ? 2 : 0);
        assertThat(Be.u64(after, 80)).as("compatible: lazy_refcounts kept").isEqualTo(1);
        assertThat(Be.u64(after, 72) & 1).as("not left dirty").isZero();
        // Everything but the autoclear field is byte for byte what it was (the unknown extension included).
        System.arraycopy(before, 88, after, 88, 8);
        assertThat(after).as("header cluster apart from autoclear").isEqualTo(before);
        assertThat(Be.u32(after, extAt)).isEqualTo(0x12345678L);

        assertCheckClean(img);
        Qemu.io(dir, "qcow2", img, List.of("read -P 0x5e 4096 70000", "read -P 0 0 4096"));
        Object info = Json.parse(Qemu.img(dir, "info", "--output=json", img));
        assertThat(Json.at(info, "format-specific", "data", "lazy-refcounts")).isEqualTo(Boolean.TRUE);
    }

    @Test
    void imageWithARealBitmapIsLeftConsistentForQemu() throws Exception {
        // We do not maintain bitmaps: the first write clears the bitmaps bit, drops the extension and frees the
        // bitmap clusters, so QEMU sees neither a stale bitmap nor leaked clusters.
        String img = qemuImage("bm.qcow2", "cluster_size=65536", "16M");
        Qemu.img(dir, "bitmap", "--add", img, "b0");
        Qemu.io(dir, "qcow2", img, List.of("write -P 0x01 0 64k"));
        assertThat(u64At(img, 88) & 1).as("sanity: QEMU set the bitmaps bit").isEqualTo(1);
        assertThat(Qemu.img(dir, "info", img)).contains("b0");
        try (Qcow2Image q = Images.openWritable(img, OpenOptions.defaults())) {
            q.write(ByteBuffer.wrap(new byte[]{9, 9, 9, 9}), 1L << 20);
        }
        assertThat(u64At(img, 88) & 1).as("bitmaps bit cleared by our write").isZero();
        assertCheckClean(img);
        assertThat(Qemu.img(dir, "info", img)).doesNotContain("b0");
        Qemu.io(dir, "qcow2", img, List.of("read -P 0x01 0 64k", "read -P 0x09 1M 4"));
    }

    // ---- 3. metadata overlap guard ----------------------------------------------------------------------------

    @ParameterizedTest(name = "target={0} op={1}")
    @CsvSource({"l1,full", "l1,partial", "l1,discard", "l1,cow", "reftable,full", "reftable,partial", "reftable,discard",
            "reftable,cow", "refblock,full", "refblock,partial", "refblock,discard", "l2,full", "l2,partial", "l2,cow"})
    void writeThroughCorruptMappingOntoMetadataIsRefusedAndMarksCorrupt(String target, String kind) throws Exception {
        String img = qemuImage("o.qcow2", "cluster_size=65536", "16M");
        Qemu.io(dir, "qcow2", img, List.of("write -P 0x11 0 64k", "write -P 0x22 1M 64k", "write -P 0x33 3M 64k"));
        long l1Off = u64At(img, 40);
        long rtOff = u64At(img, 48);
        long rbOff = u64At(img, rtOff) & 0x00ff_ffff_ffff_fe00L;
        long l2Off = u64At(img, l1Off) & 0x00ff_ffff_ffff_fe00L;
        long victim = switch (target) {
            case "l1" -> l1Off;
            case "reftable" -> rtOff;
            case "refblock" -> rbOff;
            default -> l2Off;
        };
        // Guest cluster 16 (1 MiB) now claims the metadata cluster, COPIED set (refcount 1, so it looks consistent);
        // for "cow" without COPIED, so a write goes to a new cluster and then drops the metadata's refcount.
        long entryAt = l2Off + 16 * 8;
        put64At(img, entryAt, victim | (kind.equals("cow") ? 0 : 1L << 63));
        byte[] l1Before = readAt(img, l1Off, 65536);
        byte[] rtBefore = readAt(img, rtOff, 65536);
        byte[] rbBefore = readAt(img, rbOff, 65536);
        byte[] l2Before = readAt(img, l2Off, 65536);

        try (Qcow2Image q = Images.openWritable(img, OpenOptions.defaults())) {
            byte[] data = new byte[kind.equals("partial") ? 1000 : 65536];
            Arrays.fill(data, (byte) 0xee);
            long at = kind.equals("partial") ? (1L << 20) + 512 : 1L << 20;
            assertThatThrownBy(() -> {
                if (kind.equals("discard")) {
                    q.discard(at, 65536);
                } else {
                    q.write(ByteBuffer.wrap(data), at);
                }
                q.flush();
            }).isInstanceOf(IOException.class).satisfies(e -> assertThat(e.getMessage()).contains("overlap"));
            assertThat(u64At(img, 72) & 2).as("corrupt bit set in the header").isEqualTo(2);
            // A legitimate write elsewhere is refused as well.
            assertThatThrownBy(() -> q.write(ByteBuffer.wrap(new byte[4096]), 3L << 20)).isInstanceOf(IOException.class);
            assertThatThrownBy(() -> q.write(ByteBuffer.wrap(new byte[65536]), 8L << 20)).isInstanceOf(IOException.class);
            assertThatThrownBy(q::flush).isInstanceOf(IOException.class);
        }
        assertThat(readAt(img, l1Off, 65536)).as("L1 table unchanged").isEqualTo(l1Before);
        assertThat(readAt(img, rtOff, 65536)).as("refcount table unchanged").isEqualTo(rtBefore);
        assertThat(readAt(img, rbOff, 65536)).as("refcount block unchanged").isEqualTo(rbBefore);
        assertThat(readAt(img, l2Off, 65536)).as("L2 table unchanged").isEqualTo(l2Before);
        assertThat(u64At(img, 72) & 2).as("corrupt bit still set after close").isEqualTo(2);
        // Reopened: writes are refused until repaired.
        try (Qcow2Image q = Images.openWritable(img, OpenOptions.defaults())) {
            assertThatThrownBy(() -> q.write(ByteBuffer.wrap(new byte[512]), 3L << 20))
                    .isInstanceOf(IOException.class)
                    .satisfies(e -> assertThat(e.getMessage()).contains("corrupt"));
        } catch (IOException refusedAtOpen) {
            assertThat(refusedAtOpen.getMessage()).contains("corrupt");
        }
        Object info = Json.parse(Qemu.img(dir, "info", "--output=json", img));
        assertThat(Json.at(info, "format-specific", "data", "corrupt")).as("QEMU sees the corrupt bit").isEqualTo(Boolean.TRUE);
    }

    // ---- 4. discard gives space back ---------------------------------------------------------------------------

    private long allocatedBytes(String file) {
        String[] f = Qemu.exec(dir, List.of("stat", "-c", "%b %B", file)).ok().out().trim().split(" ");
        return Long.parseLong(f[0]) * Long.parseLong(f[1]);
    }

    @Test
    void discardGivesSpaceBackAndTruncatesTheTail() throws Exception {
        long size = 1L << 30, chunk = 4L << 20, cs = 65536;
        String img = path("d.qcow2");
        Qcow2Create.create(img, CreateOptions.defaults(size));
        byte[] buf = new byte[(int) chunk];
        new Random(42).nextBytes(buf);
        try (Qcow2Image q = Images.openWritable(img, OpenOptions.defaults())) {
            for (long off = 0; off < size; off += chunk) {
                stamp(buf, off, cs);
                q.write(ByteBuffer.wrap(buf), off);
            }
            q.flush();
        }
        long full = allocatedBytes(img);
        assertThat(full).as("1 GiB of data written").isGreaterThanOrEqualTo(size);
        // Keep [0, 100 MiB) and a 4 MiB island at 600 MiB; discard the rest (it covers the end of the image).
        long keep = 100L << 20, island = 600L << 20;
        try (Qcow2Image q = Images.openWritable(img, OpenOptions.defaults())) {
            q.discard(keep, island - keep);
            q.discard(island + chunk, size - island - chunk);
            q.flush();
        }
        long discarded = size - keep - chunk;
        long after = allocatedBytes(img);
        assertThat(full - after).as("allocated bytes given back: %d before, %d after", full, after)
                .isGreaterThanOrEqualTo(discarded * 85 / 100);
        Qemu.Result check = Qemu.imgRaw(dir, "check", "--output=json", img);
        assertThat(check.exit()).as("qemu-img check: %s%s", check.out(), check.err()).isZero();
        long end = ((Number) Json.at(Json.parse(check.out()), "image-end-offset")).longValue();
        long fileSize = Files.size(Path.of(img));
        assertThat(fileSize).as("file truncated to the last used cluster (image-end-offset %d)", end).isEqualTo(end);
        assertThat(fileSize).as("the freed tail is gone").isLessThan(island + chunk + (4L << 20));
        try (BlockDevice d = Images.open(img, OpenOptions.defaults())) {
            ByteBuffer got = ByteBuffer.allocate((int) chunk);
            for (long off = 0; off < size; off += chunk) {
                got.clear();
                d.read(got, off);
                if (off < keep || off == island) {
                    stamp(buf, off, cs);
                    assertThat(Arrays.mismatch(got.array(), buf)).as("kept data at %d: first difference", off).isEqualTo(-1);
                } else if (off % (64L << 20) == 0 || off == size - chunk) {
                    assertThat(Arrays.mismatch(got.array(), new byte[(int) chunk])).as("discarded data at %d reads as zeros", off)
                            .isEqualTo(-1);
                }
            }
        }
    }

    /** Makes every cluster of the chunk at {@code off} distinct: its guest offset in its first 8 bytes. */
    private static void stamp(byte[] buf, long off, long cs) {
        for (int i = 0; i < buf.length; i += (int) cs) {
            Be.put64(buf, i, off + i + 1);
        }
    }

    // ---- 5. writes into QEMU-made images with snapshots (shared clusters) ------------------------------------

    @ParameterizedTest(name = "{0}")
    @ValueSource(strings = {"cluster_size=65536", "cluster_size=4096,refcount_bits=16", "cluster_size=65536,compat=0.10",
            "cluster_size=65536,extended_l2=on", "cluster_size=512,refcount_bits=8"})
    void randomWritesIntoQemuImageWithSnapshotsStayConsistent(String opts) throws Exception {
        long size = 6L << 20;
        String img = qemuImage("s.qcow2", opts, Long.toString(size));
        Qemu.io(dir, "qcow2", img, List.of("write -P 0x11 0 1M", "write -P 0x12 1536k 300k", "write -P 0x13 5000k 10k",
                "write -z 100k 60k"));
        Qemu.img(dir, "snapshot", "-c", "s1", img);
        Qemu.io(dir, "qcow2", img, List.of("write -P 0x21 512k 1M", "write -P 0x22 4M 512", "discard 64k 64k"));
        Qemu.img(dir, "snapshot", "-c", "s2", img);
        Qemu.io(dir, "qcow2", img, List.of("write -P 0x31 3M 100k"));
        Qemu.img(dir, "convert", "-O", "raw", "-l", "snapshot.name=s1", img, "s1.raw");
        Qemu.img(dir, "convert", "-O", "raw", "-l", "snapshot.name=s2", img, "s2.raw");
        Qemu.img(dir, "convert", "-O", "raw", img, "active.raw");
        byte[] model = Files.readAllBytes(dir.resolve("active.raw"));

        long cs = ((Number) Json.at(Json.parse(Qemu.img(dir, "info", "--output=json", img)), "cluster-size")).longValue();
        Random r = new Random(opts.hashCode());
        try (Qcow2Image q = Images.openWritable(img, OpenOptions.defaults())) {
            for (int i = 0; i < 250; i++) {
                int kind = r.nextInt(10);
                long off = WriterModelTest.randomOffset(r, size, cs);
                long len = Math.min(size - off, WriterModelTest.randomLength(r, cs));
                if (kind < 6) {
                    byte[] data = new byte[(int) len];
                    r.nextBytes(data);
                    q.write(ByteBuffer.wrap(data), off);
                    System.arraycopy(data, 0, model, (int) off, (int) len);
                } else if (kind < 8) {
                    q.writeZeroes(off, len, r.nextBoolean());
                    Arrays.fill(model, (int) off, (int) (off + len), (byte) 0);
                } else if (kind < 9) {
                    q.discard(off, len);
                    Arrays.fill(model, (int) off, (int) (off + len), (byte) 0);
                } else {
                    q.flush();
                }
            }
            WriterModelTest.assertRange(q, model, 0, size);
        }
        assertCheckClean(img);
        Files.write(dir.resolve("model.raw"), model);
        assertThat(Qemu.imgRaw(dir, "compare", "-f", "qcow2", "-F", "raw", img, "model.raw").exit())
                .as("active layer equals the model").isZero();
        for (String s : new String[]{"s1", "s2"}) {
            Qemu.img(dir, "convert", "-O", "raw", "-l", "snapshot.name=" + s, img, s + ".after.raw");
            assertThat(Files.mismatch(dir.resolve(s + ".raw"), dir.resolve(s + ".after.raw"))).as("snapshot %s unchanged", s)
                    .isEqualTo(-1);
        }
        Qemu.img(dir, "snapshot", "-d", "s1", img);
        assertCheckClean(img);
        Qemu.img(dir, "convert", "-O", "raw", "-l", "snapshot.name=s2", img, "s2.last.raw");
        assertThat(Files.mismatch(dir.resolve("s2.raw"), dir.resolve("s2.last.raw"))).isEqualTo(-1);
        Qemu.img(dir, "snapshot", "-d", "s2", img);
        assertCheckClean(img);
        assertThat(Qemu.imgRaw(dir, "compare", "-f", "qcow2", "-F", "raw", img, "model.raw").exit()).isZero();
    }

    // ---- 8. DeviceChannel -------------------------------------------------------------------------------------

    @Test
    void deviceChannelReadWritePositionSize() throws Exception {
        String img = path("c.qcow2");
        long size = 1L << 20;
        Qcow2Create.create(img, CreateOptions.defaults(size).withClusterBits(12));
        try (Qcow2Image q = Images.openWritable(img, OpenOptions.defaults())) {
            DeviceChannel ch = new DeviceChannel(q);
            assertThat(ch.size()).isEqualTo(size);
            assertThat(ch.position()).isZero();
            assertThat(ch.isOpen()).isTrue();
            byte[] hello = "hello, channel".getBytes(StandardCharsets.US_ASCII);
            ch.position(5000);
            assertThat(ch.write(ByteBuffer.wrap(hello))).isEqualTo(hello.length);
            assertThat(ch.position()).isEqualTo(5000 + hello.length);
            ch.position(4998);
            ByteBuffer got = ByteBuffer.allocate(hello.length + 4);
            assertThat(ch.read(got)).isEqualTo(hello.length + 4);
            assertThat(Arrays.copyOfRange(got.array(), 2, 2 + hello.length)).isEqualTo(hello);
            assertThat(got.array()[0]).isZero();
            // Reads stop at the end; at the end they return -1 (0 for an empty buffer).
            ch.position(size - 3);
            ByteBuffer tail = ByteBuffer.allocate(10);
            assertThat(ch.read(tail)).isEqualTo(3);
            assertThat(ch.position()).isEqualTo(size);
            assertThat(ch.read(ByteBuffer.allocate(10))).isEqualTo(-1);
            assertThat(ch.read(ByteBuffer.allocate(0))).isZero();
            ch.position(size + 100);
            assertThat(ch.read(ByteBuffer.allocate(10))).isEqualTo(-1);
            assertThat(ch.position()).isEqualTo(size + 100);
            // Writes must stay inside the virtual size; a refused write moves nothing and writes nothing.
            assertThatThrownBy(() -> ch.write(ByteBuffer.wrap(new byte[1]))).isInstanceOf(IOException.class);
            ch.position(size - 2);
            ByteBuffer over = ByteBuffer.wrap(new byte[]{9, 9, 9});
            assertThatThrownBy(() -> ch.write(over)).isInstanceOf(IOException.class);
            assertThat(ch.position()).isEqualTo(size - 2);
            assertThat(over.remaining()).isEqualTo(3);
            assertThat(ch.write(ByteBuffer.wrap(new byte[]{7, 8}))).isEqualTo(2);
            assertThat(ch.position()).isEqualTo(size);
            assertThat(ch.size()).as("writes do not grow the device").isEqualTo(size);
            assertThatThrownBy(() -> ch.position(-1)).isInstanceOf(IllegalArgumentException.class);
            assertThatThrownBy(() -> ch.truncate(10)).isInstanceOf(UnsupportedOperationException.class);
            ch.close();
            assertThat(ch.isOpen()).isFalse();
            assertThatThrownBy(() -> ch.read(ByteBuffer.allocate(1))).isInstanceOf(ClosedChannelException.class);
            assertThatThrownBy(() -> ch.write(ByteBuffer.allocate(1))).isInstanceOf(ClosedChannelException.class);
            assertThatThrownBy(ch::position).isInstanceOf(ClosedChannelException.class);
            // Closing the channel leaves the device open.
            ByteBuffer b = ByteBuffer.allocate(2);
            q.read(b, size - 2);
            assertThat(b.array()).containsExactly(7, 8);
        }
        assertCheckClean(img);
        Qemu.io(dir, "qcow2", img, List.of("read -P 0x07 " + (size - 2) + " 1", "read -P 0 " + (size - 3) + " 1"));
        try (BlockDevice d = Images.open(img, OpenOptions.defaults())) {
            DeviceChannel ch = new DeviceChannel(d);
            assertThatThrownBy(() -> ch.write(ByteBuffer.allocate(1))).isInstanceOf(NonWritableChannelException.class);
            ch.position(5000);
            ByteBuffer got = ByteBuffer.allocate(hello().length);
            assertThat(ch.read(got)).isEqualTo(hello().length);
            assertThat(got.array()).isEqualTo(hello());
        }
    }

    private static byte[] hello() {
        return "hello, channel".getBytes(StandardCharsets.US_ASCII);
    }

    @Test
    void deviceChannelOverReadOnlyQcow2IsNotWritable() throws Exception {
        String img = qemuImage("ro.qcow2", "cluster_size=65536", "1M");
        try (BlockDevice d = Images.open(img, OpenOptions.defaults())) {
            DeviceChannel ch = new DeviceChannel(d);
            assertThatThrownBy(() -> ch.write(ByteBuffer.allocate(1))).isInstanceOf(NonWritableChannelException.class);
            assertThat(ch.read(ByteBuffer.allocate(100))).isEqualTo(100);
        }
    }
}
