package org.qdedup.dedup;

import static org.assertj.core.api.Assertions.assertThat;

import java.io.ByteArrayOutputStream;
import java.io.PrintStream;
import java.nio.ByteBuffer;
import java.nio.channels.FileChannel;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardCopyOption;
import java.nio.file.StandardOpenOption;
import java.util.Arrays;
import java.util.Random;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;
import org.qdedup.cli.Main;
import org.qdedup.format.Features;
import org.qdedup.image.Images;
import org.qdedup.image.OpenOptions;
import org.qdedup.image.Qcow2Image;

/**
 * The dedup index file beside the image: written at a clean close, trusted at the next open only while the image
 * is exactly as it was then, and never leading a write to share a cluster whose content changed behind our back
 * (QEMU writing in place, qemu-img commit into a deduped base, a damaged or copied index file).
 */
class DedupPersistenceTest {
    @TempDir
    Path dir;

    static final int CS = 4096;

    record Run(int exit, String out, String err) {
    }

    private Run cli(String... args) {
        ByteArrayOutputStream o = new ByteArrayOutputStream(), e = new ByteArrayOutputStream();
        int rc = Main.run(args, new PrintStream(o, true, StandardCharsets.UTF_8), new PrintStream(e, true, StandardCharsets.UTF_8));
        return new Run(rc, o.toString(StandardCharsets.UTF_8), e.toString(StandardCharsets.UTF_8));
    }

    private String qemu(String... args) throws Exception {
        Process p = new ProcessBuilder(args).directory(dir.toFile()).redirectErrorStream(true).start();
        String out = new String(p.getInputStream().readAllBytes());
        assertThat(p.waitFor()).as("%s: %s", String.join(" ", args), out).isZero();
        return out;
    }

    private static byte[] pattern(int seed) {
        byte[] b = new byte[CS];
        new Random(seed).nextBytes(b);
        return b;
    }

    private String img() {
        return dir.resolve("d.qcow2").toString();
    }

    private Path indexFile() {
        return dir.resolve("d.qcow2" + DedupSidecar.SUFFIX);
    }

    /** A dedup image holding pattern A at offset 0 only, closed cleanly (index file written). */
    private byte[] deduped() throws Exception {
        assertThat(cli("create", "--dedup", img(), "4M").exit()).isZero();
        byte[] a = pattern(1);
        try (Qcow2Image q = Images.openWritable(img(), OpenOptions.defaults())) {
            q.write(ByteBuffer.wrap(a), 0);
            q.write(ByteBuffer.wrap(pattern(2)), CS);
        }
        assertThat(indexFile()).exists();
        return a;
    }

    private byte[] readAll() throws Exception {
        try (var d = Images.open(img(), OpenOptions.defaults())) {
            ByteBuffer b = ByteBuffer.allocate((int) d.size());
            d.read(b, 0);
            return b.array();
        }
    }

    private long hostOf(long guest) throws Exception {
        Matcher m = Pattern.compile("\"start\": (\\d+), \"length\": (\\d+),.*\"data\": true, \"offset\": (\\d+)")
                .matcher(qemu("qemu-img", "map", "--output=json", img()));
        while (m.find()) {
            long start = Long.parseLong(m.group(1)), len = Long.parseLong(m.group(2)), off = Long.parseLong(m.group(3));
            if (guest >= start && guest < start + len) {
                return off + guest - start;
            }
        }
        throw new AssertionError("guest offset " + guest + " not mapped");
    }

    @Test
    void indexFileIsWrittenAtCloseAndTrustedAtTheNextOpen() throws Exception {
        byte[] a = deduped();
        try (Qcow2Image q = Images.openWritable(img(), OpenOptions.defaults())) {
            assertThat(q.header().autoclearFeatures() & Features.AUTOCLEAR_DEDUP_INDEX).isNotZero();
            q.write(ByteBuffer.wrap(a), 2 * CS);
            assertThat(q.writer().dedupIndexSource()).isEqualTo("index file");
            assertThat(q.writer().dedupCounters().hits).isEqualTo(1);
            assertThat(q.writer().staleDedupEntries()).isZero();
        }
        assertThat(qemu("qemu-img", "check", img())).contains("No errors were found");
        Run check = cli("check", img());
        assertThat(check.out()).contains("Dedup index: in sync with the image (2 entries in d.qcow2.qdedup-index)");
        Run json = cli("check", "--output=json", img());
        assertThat(json.out()).contains("\"dedup-index\": \"in-sync\"").contains("\"dedup-index-entries\": 2");
        assertThat(hostOf(0)).isEqualTo(hostOf(2 * CS));
    }

    @Test
    void qemuWritingInPlaceIsNoticedAndNeverShared() throws Exception {
        byte[] a = deduped();
        // QEMU overwrites A's cluster in place (refcount 1, COPIED): the cluster no longer holds A.
        long hostA = hostOf(0);
        qemu("qemu-io", "-c", "write -P 0x55 0 4k", img());
        assertThat(hostOf(0)).isEqualTo(hostA);
        Run check = cli("check", img());
        assertThat(check.out()).contains("Dedup index: rebuilt from the image at the next read-write open");

        // qdedup writes A again elsewhere, with convert -n --dedup: it must store A, not point at QEMU's data.
        byte[] expect = readAll();
        System.arraycopy(a, 0, expect, 2 * CS, CS);
        Files.write(dir.resolve("src.raw"), expect);
        Run conv = cli("convert", "-n", "--dedup", "-O", "qcow2", dir.resolve("src.raw").toString(), img());
        assertThat(conv.exit()).as(conv.err()).isZero();
        assertThat(readAll()).isEqualTo(expect);

        // and through the library
        try (Qcow2Image q = Images.openWritable(img(), OpenOptions.defaults())) {
            q.write(ByteBuffer.wrap(a), 3 * CS);
            assertThat(q.writer().staleDedupEntries()).isZero();
        }
        System.arraycopy(a, 0, expect, 3 * CS, CS);
        assertThat(readAll()).isEqualTo(expect);
        assertThat(qemu("qemu-img", "check", img())).contains("No errors were found");
    }

    @Test
    void aWriterThatKeepsTheBitIsCaughtByTheFileStamp() throws Exception {
        byte[] a = deduped();
        long hostA = hostOf(0);
        // Bytes changed in place without touching the header (what a read-only QEMU reopened for writing does).
        byte[] other = pattern(9);
        try (FileChannel ch = FileChannel.open(Path.of(img()), StandardOpenOption.WRITE)) {
            ch.write(ByteBuffer.wrap(other), hostA);
        }
        try (Qcow2Image q = Images.openWritable(img(), OpenOptions.defaults())) {
            assertThat(q.header().autoclearFeatures() & Features.AUTOCLEAR_DEDUP_INDEX).as("bit still set").isNotZero();
            q.write(ByteBuffer.wrap(a), 2 * CS);
            assertThat(q.writer().dedupIndexSource()).contains("scan of the image").contains("size, inode or times");
            assertThat(q.writer().dedupCounters().hits).isZero();
            assertThat(q.writer().staleDedupEntries()).isZero();
        }
        byte[] got = readAll();
        assertThat(Arrays.copyOfRange(got, 0, CS)).isEqualTo(other);
        assertThat(Arrays.copyOfRange(got, 2 * CS, 3 * CS)).isEqualTo(a);
    }

    @Test
    void commitOfAnOverlayIntoADedupedBaseIsNoticed() throws Exception {
        byte[] a = deduped();
        qemu("qemu-img", "create", "-f", "qcow2", "-b", "d.qcow2", "-F", "qcow2", "top.qcow2");
        qemu("qemu-io", "-c", "write -P 0x66 0 4k", "top.qcow2");
        qemu("qemu-img", "commit", "top.qcow2");
        byte[] expect = readAll();
        assertThat(expect[0]).isEqualTo((byte) 0x66);
        try (Qcow2Image q = Images.openWritable(img(), OpenOptions.defaults())) {
            assertThat(q.writer().dedupIndexSource()).isNotEqualTo("index file");
            q.write(ByteBuffer.wrap(a), 2 * CS);
            assertThat(q.writer().staleDedupEntries()).isZero();
        }
        System.arraycopy(a, 0, expect, 2 * CS, CS);
        assertThat(readAll()).isEqualTo(expect);
        assertThat(qemu("qemu-img", "check", img())).contains("No errors were found");
    }

    @Test
    void damagedMissingOrCopiedIndexFilesAreRebuiltNotTrusted() throws Exception {
        byte[] a = deduped();
        // 1. damaged: one flipped byte in an entry
        byte[] f = Files.readAllBytes(indexFile());
        f[DedupSidecar.HEADER_SIZE + 1] ^= 1;
        Files.write(indexFile(), f);
        try (Qcow2Image q = Images.openWritable(img(), OpenOptions.defaults())) {
            q.write(ByteBuffer.wrap(a), 2 * CS);
            assertThat(q.writer().dedupIndexSource()).contains("scan of the image").contains("dedup index checksum");
            assertThat(q.writer().dedupCounters().hits).isEqualTo(1);
        }
        // 1b. what a power cut can leave of an index file that is not synced: cut short, or empty
        byte[] whole = Files.readAllBytes(indexFile());
        Files.write(indexFile(), java.util.Arrays.copyOf(whole, whole.length - 6));
        try (Qcow2Image q = Images.openWritable(img(), OpenOptions.defaults())) {
            q.write(ByteBuffer.wrap(a), 6 * CS);
            assertThat(q.writer().dedupIndexSource()).contains("scan of the image").contains("dedup index entry count");
            assertThat(q.writer().dedupCounters().hits).isEqualTo(1);
        }
        Files.write(indexFile(), new byte[0]);
        try (Qcow2Image q = Images.openWritable(img(), OpenOptions.defaults())) {
            q.write(ByteBuffer.wrap(a), 7 * CS);
            assertThat(q.writer().dedupIndexSource()).contains("scan of the image").contains("dedup index header");
            assertThat(q.writer().dedupCounters().hits).isEqualTo(1);
        }
        // 2. missing
        Files.delete(indexFile());
        try (Qcow2Image q = Images.openWritable(img(), OpenOptions.defaults())) {
            q.write(ByteBuffer.wrap(a), 3 * CS);
            assertThat(q.writer().dedupIndexSource()).contains("no index file");
        }
        assertThat(indexFile()).as("written again at close").exists();
        // 3. image and index file copied: a new inode, so the copy rebuilds; the original still trusts its own.
        Files.copy(Path.of(img()), dir.resolve("copy.qcow2"), StandardCopyOption.COPY_ATTRIBUTES);
        Files.copy(indexFile(), dir.resolve("copy.qcow2" + DedupSidecar.SUFFIX), StandardCopyOption.COPY_ATTRIBUTES);
        try (Qcow2Image q = Images.openWritable(dir.resolve("copy.qcow2").toString(), OpenOptions.defaults())) {
            q.write(ByteBuffer.wrap(a), 4 * CS);
            assertThat(q.writer().dedupIndexSource()).contains("size, inode or times");
        }
        try (Qcow2Image q = Images.openWritable(img(), OpenOptions.defaults())) {
            q.write(ByteBuffer.wrap(a), 4 * CS);
            assertThat(q.writer().dedupIndexSource()).isEqualTo("index file");
        }
        // 4. an edit by qdedup itself (snapshot) makes the index file stale before it changes anything
        assertThat(cli("snapshot", "-c", "s1", img()).exit()).isZero();
        try (Qcow2Image q = Images.openWritable(img(), OpenOptions.defaults())) {
            assertThat(q.header().autoclearFeatures() & Features.AUTOCLEAR_DEDUP_INDEX).isZero();
            q.write(ByteBuffer.wrap(a), 5 * CS);
            assertThat(q.writer().dedupIndexSource()).contains("in-sync bit clear");
        }
        assertThat(qemu("qemu-img", "check", img())).contains("No errors were found");
    }

    /**
     * An index file whose entries lie (keys swapped between two clusters) but whose checksum and stamp are valid is
     * trusted, and still never makes a write share a cluster of other content: every candidate is compared byte for
     * byte first.
     */
    @Test
    void anIndexFileThatLiesUnderAValidStampNeverSharesWrongContent() throws Exception {
        byte[] a = deduped();
        byte[] b = pattern(2);
        byte[] f = Files.readAllBytes(indexFile());
        int h = DedupSidecar.HEADER_SIZE;
        assertThat(ByteBuffer.wrap(f, 56, 8).getLong()).as("entries").isEqualTo(2);
        byte[] key0 = Arrays.copyOfRange(f, h, h + 4);
        System.arraycopy(f, h + 8, f, h, 4);
        System.arraycopy(key0, 0, f, h + 8, 4);
        java.util.zip.CRC32C crc = new java.util.zip.CRC32C();
        crc.update(f, 0, h + 16);
        ByteBuffer.wrap(f, h + 16, 4).putInt((int) crc.getValue());
        Files.write(indexFile(), f);
        try (Qcow2Image q = Images.openWritable(img(), OpenOptions.defaults())) {
            q.write(ByteBuffer.wrap(a), 2 * CS);
            q.write(ByteBuffer.wrap(b), 3 * CS);
            assertThat(q.writer().dedupIndexSource()).as("the lying file is trusted").isEqualTo("index file");
            assertThat(q.writer().dedupCounters().fragmentCollisions).as("candidates refused by their bytes").isEqualTo(2);
            q.write(ByteBuffer.wrap(a), 4 * CS); // shares with one of the real copies of A now indexed
        }
        byte[] all = readAll();
        for (int[] at : new int[][]{{0, 1}, {1, 2}, {2, 1}, {3, 2}, {4, 1}}) {
            assertThat(Arrays.copyOfRange(all, at[0] * CS, at[0] * CS + CS)).as("cluster %d", at[0])
                    .isEqualTo(at[1] == 1 ? a : b);
        }
        assertThat(hostOf(2 * CS)).isNotEqualTo(hostOf(CS));
        assertThat(hostOf(3 * CS)).isNotEqualTo(hostOf(0));
        assertThat(hostOf(4 * CS)).isIn(hostOf(0), hostOf(2 * CS));
        assertThat(qemu("qemu-img", "check", img())).contains("No errors were found");
    }
}
