package org.qdedup;

import static org.assertj.core.api.Assertions.assertThat;
import static org.junit.jupiter.api.Assertions.assertTimeoutPreemptively;

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.PrintStream;
import java.io.RandomAccessFile;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.attribute.FileTime;
import java.security.MessageDigest;
import java.time.Duration;
import java.util.ArrayList;
import java.util.HexFormat;
import java.util.List;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;
import org.qdedup.cli.Main;

/**
 * Corrupt and hostile images: every class of bad input must end in one line on stderr naming the file (and where
 * it matters the structure and offset), exit 1 (2 for compare), no stack trace, no hang, and no change to the image.
 * Each image starts as a valid one made by qemu-img / qemu-io and then has bytes changed.
 */
class BadInputTest {
    private static final Duration LIMIT = Duration.ofSeconds(20);
    private static final long L1_OFFSET_MASK = 0x00ff_ffff_ffff_fe00L;
    /** {@code -Dqdedup.test.verbose=true} prints every command with its exit code and stderr line. */
    private static final boolean VERBOSE = Boolean.getBoolean("qdedup.test.verbose");

    @TempDir
    Path dir;

    // ---------------------------------------------------------------- tests

    @Test
    void truncatedFile() throws Exception {
        // 10 bytes: not even a v2 header.
        Path t10 = base("t10.qcow2");
        truncate(t10, 10);
        expectOpenError(t10, "qcow2 header", "offset 0", "72 bytes", "found 10 bytes");

        // 100 bytes: a v3 header needs 104.
        Path t100 = base("t100.qcow2");
        truncate(t100, 100);
        expectOpenError(t100, "v3 header", "offset 0", "104", "found 100 bytes");

        // Inside the header extensions (the feature name table runs from 112 to 504).
        Path t200 = base("t200.qcow2");
        truncate(t200, 200);
        expectOpenError(t200, "extension", "offset 116");

        // In the middle of the refcount table.
        Path trt = base("trt.qcow2");
        truncate(trt, u64(trt, 48) + 100);
        expectOpenError(trt, "table", "inside the file");

        // Empty file read as qcow2.
        Path t0 = base("t0.qcow2");
        truncate(t0, 0);
        expectError(t0, t0.toString(), new String[]{"info", "-f", "qcow2", t0.toString()}, "offset 0", "found 0 bytes");

        // In the middle of the L1 table (8 entries of a 4 GiB image).
        Path tl1 = base("tl1.qcow2");
        long l1 = u64(tl1, 40);
        assertThat(u32(tl1, 36)).isEqualTo(8);
        truncate(tl1, l1 + 32);
        expectOpenError(tl1, "L1 table", "offset 40");

        // In the middle of an L2 table: the header and its tables are fine (info works), reading the L2 is not.
        Path tl2 = base("tl2.qcow2");
        long l2 = u64(tl2, l1) & L1_OFFSET_MASK;
        assertThat(l2).isGreaterThan(u64(tl2, 40));
        truncate(tl2, l2 + 32768);
        expectInfoTolerates(tl2);
        expectReadError(tl2, true, "L1 entry 0", "offset " + l1, "L2 table offset " + l2);
    }

    @Test
    void badMagicWithFormatQcow2() throws Exception {
        Path img = base("magic.qcow2");
        patch(img, 0, "QFI\0".getBytes(StandardCharsets.ISO_8859_1));
        String file = img.toString();
        List<String[]> cmds = List.of(
                new String[]{"info", "-f", "qcow2", file},
                new String[]{"info", "-f", "qcow2", "--output=json", file},
                new String[]{"map", "-f", "qcow2", "--output=json", file},
                new String[]{"convert", "-f", "qcow2", "-O", "raw", file, out()},
                new String[]{"compare", "-f", "qcow2", "-F", "qcow2", file, good()});
        for (String[] c : cmds) {
            expectError(img, file, c, "magic", "offset 0", "0x514649fb", "0x51464900");
        }
    }

    @Test
    void clusterBitsOutOfRange() throws Exception {
        for (int bits : new int[]{8, 22}) {
            Path img = base("cb" + bits + ".qcow2");
            put32(img, 20, bits);
            expectOpenError(img, "cluster_bits", "offset 20", "9..21", "found " + bits);
        }
        Path huge = base("cbhuge.qcow2");
        put32(huge, 20, 0xffff_ffffL);
        expectOpenError(huge, "cluster_bits", "offset 20", "found 4294967295");
    }

    @Test
    void l1TableTooLarge() throws Exception {
        Path img = base("l1big.qcow2");
        put32(img, 36, (4L << 20) + 1);
        expectOpenError(img, "l1_size", "offset 36", "found " + ((4 << 20) + 1));
        Path max = base("l1max.qcow2");
        put32(max, 36, 0xffff_ffffL);
        expectOpenError(max, "l1_size", "offset 36", "found 4294967295");
    }

    /**
     * Found by ImageFuzzTest: a size near 2^63 overflowed the "L1 entries the size needs" sum, passed as an image of
     * 8 EiB against an L1 table of 8 entries, and map and convert then walked it without end.
     */
    @Test
    void sizeNearTwoToThe63NeedsItsL1Table() throws Exception {
        Path img = base("sizemax.qcow2");
        put64(img, 24, Long.MAX_VALUE);
        expectOpenError(img, "l1_size", "offset 36", "found 8");
    }

    @Test
    void l1TableUnaligned() throws Exception {
        Path img = base("l1unaligned.qcow2");
        long l1 = u64(img, 40);
        put64(img, 40, l1 + 8);
        expectOpenError(img, "L1 table", "offset 40", "found " + (l1 + 8));
    }

    @Test
    void l1TablePastEndOfFile() throws Exception {
        Path img = base("l1eof.qcow2");
        long far = roundUp(Files.size(img), 65536) + (1L << 20);
        put64(img, 40, far);
        expectOpenError(img, "L1 table", "offset 40", Long.toString(far));
        // A table that starts inside the file but runs past its end (l1_size raised, still under the cap).
        Path run = base("l1run.qcow2");
        put32(run, 36, 1 << 20);
        expectOpenError(run, "L1 table", "offset 40", "inside the file");
    }

    @Test
    void refcountTableTooLarge() throws Exception {
        Path img = base("rtbig.qcow2");
        put32(img, 56, 129); // 8 MiB of 64 KiB clusters is 128
        expectOpenError(img, "refcount_table_clusters", "offset 56", "found 129");
        Path max = base("rtmax.qcow2");
        put32(max, 56, 0xffff_ffffL);
        expectOpenError(max, "refcount_table_clusters", "offset 56", "found 4294967295");
    }

    /**
     * Found by ImageFuzzTest: a write into an image with an empty refcount table, or with its first refcount block
     * gone from the table, reported success and was lost: every cluster looked free, the new L2 table or refcount
     * block landed on the header. An empty table is refused at open (as QEMU does); an allocation that would land on
     * metadata is refused and the image marked corrupt, as QEMU's overlap checks do.
     */
    @Test
    void allocationsNeverLandOnMetadata() throws Exception {
        Path empty = base("rtclusters0.qcow2");
        put32(empty, 56, 0);
        expectOpenError(empty, "refcount_table_clusters", "offset 56", "at least 1", "found 0");

        Path img = base("rtentry0.qcow2");
        long rt = u64(img, 48);
        put64(img, rt, 0); // the block that counts the header, the tables and the data is gone
        byte[] c = new byte[65536];
        java.util.Arrays.fill(c, (byte) 0x5a);
        org.assertj.core.api.Assertions.assertThatThrownBy(() -> {
            try (org.qdedup.image.Qcow2Image q = org.qdedup.image.Images.openWritable(img.toString(),
                    org.qdedup.image.OpenOptions.defaults())) {
                q.write(java.nio.ByteBuffer.wrap(c), 2L << 30); // guest 2 GiB: a new L2 table and a data cluster
                q.flush();
            }
        }).isInstanceOf(IOException.class).hasMessageContaining("refusing an allocation").hasMessageContaining("overlaps the");
        assertThat(u64(img, 72) & 2).as("marked corrupt").isEqualTo(2);
        Qemu.Result read = Qemu.exec(dir, List.of("qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0x11 0 128k", "-c",
                "read -P 0x22 1G 64k", img.toString()));
        assertThat(read.exit()).as("the data is still there: %s%s", read.out(), read.err()).isZero();
        assertThat(read.out() + read.err()).doesNotContain("fail");
    }

    @Test
    void refcountTableUnaligned() throws Exception {
        Path img = base("rtunaligned.qcow2");
        long rt = u64(img, 48);
        put64(img, 48, rt + 512);
        expectOpenError(img, "refcount table", "offset 48", "found " + (rt + 512));
        Path zero = base("rtzero.qcow2");
        put64(zero, 48, 0);
        expectOpenError(zero, "refcount table", "offset 48", "found 0");
    }

    @Test
    void refcountTablePastEndOfFile() throws Exception {
        Path img = base("rteof.qcow2");
        long far = roundUp(Files.size(img), 65536) + (1L << 20);
        put64(img, 48, far);
        expectOpenError(img, "refcount table", "offset 48", Long.toString(far));
        Path run = base("rtrun.qcow2");
        put32(run, 56, 100); // 6.25 MiB from 0x10000 in a file of well under 1 MiB
        expectOpenError(run, "refcount table", "offset 48", "inside the file");
    }

    @Test
    void snapshotTableTooLarge() throws Exception {
        Path img = withSnapshot("snbig.qcow2");
        put32(img, 60, 65537);
        expectOpenError(img, "nb_snapshots", "offset 60", "65536", "found 65537");
        Path max = withSnapshot("snmax.qcow2");
        put32(max, 60, 0xffff_ffffL);
        expectOpenError(max, "nb_snapshots", "offset 60", "found 4294967295");
        // Allowed by the cap but far more entries than the file can hold (40 bytes at least each).
        for (int n : new int[]{65536, 20000}) {
            Path many = withSnapshot("snmany" + n + ".qcow2");
            put32(many, 60, n);
            expectOpenError(many, "nb_snapshots", "offset 60", "found " + n);
        }
    }

    /**
     * Not bad input, the guard against over-reading: a valid table of 300 long-named entries (96 KiB), 128 MiB
     * before the end of a sparse file, is read as far as its entries go and listed in full.
     */
    @Test
    void snapshotTableInLargeFileIsReadAsFarAsItsEntries() throws Exception {
        Path img = dir.resolve("snlong.qcow2");
        Qemu.img(dir, "create", "-f", "qcow2", img.toString(), "1M");
        Qemu.io(dir, "qcow2", img.toString(), List.of("write -P 0x66 0 64k"));
        Qemu.img(dir, "snapshot", "-c", "s" + "x".repeat(254), img.toString());
        long st = u64(img, 64);
        long extra = u32(img, st + 36);
        long entryLen = roundUp(40 + extra + u16(img, st + 12) + u16(img, st + 14), 8);
        assertThat(entryLen).isGreaterThan(300);
        byte[] entry = read(img, st, (int) entryLen);
        int n = 300;
        long table = roundUp(Files.size(img), 65536);
        byte[] all = new byte[(int) (entryLen * n)];
        for (int i = 0; i < n; i++) {
            System.arraycopy(entry, 0, all, (int) (i * entryLen), (int) entryLen);
        }
        patch(img, table, all);
        put64(img, 64, table);
        put32(img, 60, n);
        truncate(img, table + (128L << 20));
        Snap before = Snap.of(img);
        Result r = runTimed("info", "--output=json", img.toString());
        assertThat(r.rc).as("info: %s", r.err).isZero();
        Object snaps = ((java.util.Map<?, ?>) Json.parse(r.out)).get("snapshots");
        assertThat((List<?>) snaps).hasSize(n);
        before.assertUnchanged(img);
    }

    @Test
    void snapshotTableUnaligned() throws Exception {
        Path img = withSnapshot("snunaligned.qcow2");
        long st = u64(img, 64);
        put64(img, 64, st + 8);
        expectOpenError(img, "snapshot table", "offset 64", "found " + (st + 8));
    }

    @Test
    void snapshotTablePastEndOfFile() throws Exception {
        Path img = withSnapshot("sneof.qcow2");
        long far = roundUp(Files.size(img), 65536) + (1L << 20);
        put64(img, 64, far);
        expectOpenError(img, "snapshot table", "offset 64", Long.toString(far));
    }

    @Test
    void reservedBitsInL2Entry() throws Exception {
        Path img = base("l2res.qcow2");
        long l1 = u64(img, 40);
        long l2 = u64(img, l1) & L1_OFFSET_MASK;
        long entry = u64(img, l2);
        assertThat(entry & L1_OFFSET_MASK).as("L2 entry 0 maps guest cluster 0").isNotZero();
        put64(img, l2, entry | 0x2);
        expectInfoTolerates(img);
        expectReadError(img, true, "L2 entry at offset " + l2, "reserved", "0x2");
        // A high reserved bit (56) too.
        Path hi = base("l2reshi.qcow2");
        put64(hi, l2, entry | (1L << 56));
        expectReadError(hi, true, "L2 entry at offset " + l2, "reserved", "0x100000000000000");
    }

    /**
     * Found by ImageFuzzTest (qemu-img calls it corruption, we read): a host offset not aligned to the cluster size
     * (its low bits are not reserved, only below 512), in a standard and in an extended L2 entry.
     */
    @Test
    void unalignedHostOffsetInL2Entry() throws Exception {
        Path img = base("l2unaligned.qcow2");
        long l2 = u64(img, u64(img, 40)) & L1_OFFSET_MASK;
        long entry = u64(img, l2);
        put64(img, l2, entry + 4096);
        expectReadError(img, true, "L2 entry at offset " + l2, "cluster-aligned host offset",
                String.format("0x%x", (entry & L1_OFFSET_MASK) + 4096));
        Path ext = dir.resolve("extl2unaligned.qcow2");
        Qemu.img(dir, "create", "-f", "qcow2", "-o", "extended_l2=on", ext.toString(), "16M");
        Qemu.io(dir, "qcow2", ext.toString(), List.of("write -P 0x11 0 64k"));
        keepTwin(ext);
        long xl2 = u64(ext, u64(ext, 40)) & L1_OFFSET_MASK;
        put64(ext, xl2, u64(ext, xl2) + 16384);
        expectReadError(ext, true, "L2 entry at offset " + xl2, "cluster-aligned host offset");
    }

    /** Found by ImageFuzzTest (qemu-img calls it corruption, we read zeros): the zero flag in a version 2 image. */
    @Test
    void zeroFlagInVersion2Image() throws Exception {
        Path img = dir.resolve("v2zero.qcow2");
        Qemu.img(dir, "create", "-f", "qcow2", "-o", "compat=0.10", img.toString(), "16M");
        Qemu.io(dir, "qcow2", img.toString(), List.of("write -P 0x11 0 64k"));
        keepTwin(img);
        long l2 = u64(img, u64(img, 40)) & L1_OFFSET_MASK;
        put64(img, l2, u64(img, l2) | 1);
        expectReadError(img, true, "L2 entry at offset " + l2, "zero flag in a version 2 image");
    }

    /** Found by ImageFuzzTest (qemu-img refused, we read): the end-of-extensions marker's length is checked too. */
    @Test
    void endOfExtensionsMarkerWithALength() throws Exception {
        Path img = base("endlen.qcow2");
        long end = u32(img, 100);
        while (u32(img, end) != 0) {
            end += 8 + ((u32(img, end + 4) + 7) & ~7L);
        }
        put32(img, end + 4, 0x20000);
        expectOpenError(img, "extension 0x00000000 length", "offset " + (end + 4), "found 131072");
    }

    @Test
    void reservedBitsInL1Entry() throws Exception {
        Path img = base("l1res.qcow2");
        long l1 = u64(img, 40);
        long entry = u64(img, l1);
        assertThat(entry & L1_OFFSET_MASK).isNotZero();
        put64(img, l1, entry | (1L << 56));
        expectInfoTolerates(img);
        expectReadError(img, true, "L1 entry 0", "offset " + l1, "reserved");
        // The same in a later L1 entry (guest offset 1 GiB is L1 index 2 with 64 KiB clusters).
        Path later = base("l1res2.qcow2");
        long e2 = u64(later, l1 + 16);
        assertThat(e2 & L1_OFFSET_MASK).isNotZero();
        put64(later, l1 + 16, e2 | 0x1);
        expectReadError(later, true, "L1 entry 2", "offset " + (l1 + 16), "reserved");
    }

    @Test
    void compressedDescriptorPastEndOfFile() throws Exception {
        Path img = dir.resolve("comp.qcow2");
        Qemu.img(dir, "create", "-f", "qcow2", img.toString(), "16M");
        Qemu.io(dir, "qcow2", img.toString(), List.of("write -c -P 0x33 0 64k", "write -P 0x44 1M 64k"));
        keepTwin(img);
        int clusterBits = (int) u32(img, 20);
        long l1 = u64(img, 40);
        long l2 = u64(img, l1) & L1_OFFSET_MASK;
        long entry = u64(img, l2);
        assertThat(entry & (1L << 62)).as("L2 entry 0 is compressed").isNotZero();
        int x = 62 - (clusterBits - 8);
        long offsetMask = (1L << x) - 1;
        long far = Files.size(img) + (1L << 20) + 123;
        put64(img, l2, (entry & ~offsetMask) | far);
        // map does not read compressed data (neither does qemu-img map); info reads no L2 at all.
        expectInfoTolerates(img);
        Result m = runTimed("map", "--output=json", img.toString());
        if (m.rc != 0) {
            assertOneLine(m, img.toString(), 1);
        }
        expectReadError(img, false, "compressed", "guest offset 0", "at offset " + l2, "host offset " + far);
    }

    /** Found by ImageFuzzTest: zstd-jni throws (ZstdException) on a bad frame header instead of returning an error. */
    @Test
    void zstdDescriptorOffByOneByte() throws Exception {
        Path img = dir.resolve("zstd.qcow2");
        Qemu.img(dir, "create", "-f", "qcow2", "-o", "compression_type=zstd", img.toString(), "16M");
        Qemu.io(dir, "qcow2", img.toString(), List.of("write -c -P 0x33 0 64k", "write -P 0x44 1M 64k"));
        keepTwin(img);
        long l2 = u64(img, u64(img, 40)) & L1_OFFSET_MASK;
        long entry = u64(img, l2);
        assertThat(entry & (1L << 62)).as("L2 entry 0 is compressed").isNotZero();
        put64(img, l2, entry + 1); // the descriptor now starts one byte into the frame: no zstd magic there
        expectReadError(img, false, "compressed cluster", "guest offset 0", "zstd frame at byte 0 corrupt");
    }

    /** Found by ImageFuzzTest: a backing_file_offset of 2^63 or more was taken as negative and passed the bounds check. */
    @Test
    void backingFileOffsetPastTwoToThe63() throws Exception {
        Path img = base("bfohuge.qcow2");
        long huge = 0xca53_d343_cdf0_5c47L;
        put64(img, 8, huge);
        expectOpenError(img, "backing_file_offset", "offset 8", "found " + Long.toUnsignedString(huge));
    }

    /**
     * Found by ImageFuzzTest: a NUL byte in the backing file name escaped as InvalidPathException. QEMU reads the name
     * as a C string, up to its first NUL, and so do we; a name that is empty up to it is no backing file.
     */
    @Test
    void backingFileNameEndsAtItsFirstNul() throws Exception {
        Qemu.img(dir, "create", "-f", "qcow2", "nulbase.qcow2", "1M");
        Qemu.io(dir, "qcow2", "nulbase.qcow2", List.of("write -P 0x55 0 64k"));
        Qemu.img(dir, "create", "-f", "qcow2", "-b", "nulbase.qcow2", "-F", "qcow2", "nul.qcow2");
        Path img = dir.resolve("nul.qcow2");
        long at = u64(img, 8);
        patch(img, at, "nulbase.qcow2\0junk".getBytes(StandardCharsets.ISO_8859_1));
        put32(img, 16, 18);
        for (String expectBacking : new String[]{"nulbase.qcow2", null}) {
            Snap before = Snap.of(img);
            Result info = runTimed("info", "--output=json", img.toString());
            assertThat(info.rc).as("info: %s", info.err).isZero();
            Object backing = ((java.util.Map<?, ?>) Json.parse(info.out)).get("backing-filename");
            assertThat(backing).isEqualTo(expectBacking);
            expectConvertAsQemu(img);
            before.assertUnchanged(img);
            patch(img, at, new byte[]{0}); // then: empty up to its NUL
        }
    }

    /**
     * Found by ImageFuzzTest: a dirty image was repaired (written) at a read-write open before the rest of it was
     * validated, so an open that then failed had changed the file. And as in QEMU, a corrupt image is refused for
     * writing at open, before any repair.
     */
    @Test
    void readWriteOpenRefusesBeforeRepairingAnything() throws Exception {
        Path img = dir.resolve("dirty.qcow2");
        Qemu.img(dir, "create", "-f", "qcow2", "-o", "lazy_refcounts=on", img.toString(), "1M");
        Qemu.io(dir, "qcow2", img.toString(), List.of("write -P 0x11 0 64k"));
        long incompat = u64(img, 72);
        put64(img, 72, incompat | 1 | 4); // dirty, and an external data file with no name extension
        Snap before = Snap.of(img);
        org.assertj.core.api.Assertions.assertThatThrownBy(
                        () -> org.qdedup.image.Images.openWritable(img.toString(), org.qdedup.image.OpenOptions.defaults()).close())
                .isInstanceOf(org.qdedup.format.FormatException.class).hasMessageContaining("no data file name extension");
        before.assertUnchanged(img);
        put64(img, 72, incompat | 1 | 2); // dirty and corrupt
        Snap corrupt = Snap.of(img);
        org.assertj.core.api.Assertions.assertThatThrownBy(
                        () -> org.qdedup.image.Images.openWritable(img.toString(), org.qdedup.image.OpenOptions.defaults()).close())
                .isInstanceOf(org.qdedup.format.FormatException.class).hasMessageContaining("marked corrupt");
        expectError(img, img.toString(), new String[]{"dedup", img.toString()}, "check -r all");
        corrupt.assertUnchanged(img);
        assertThat(runTimed("convert", "-O", "raw", img.toString(), out()).rc).as("still readable").isZero();
    }

    /**
     * Found by ImageFuzzTest: an L2 entry of a dedup image pointing far past the end of the file sized the dedup
     * index's per-cluster arrays (OutOfMemoryError at the first write); such a cluster is not indexed now.
     */
    @Test
    void dedupIndexIgnoresClustersPastTheEndOfTheFile() throws Exception {
        Path img = dir.resolve("ddfar.qcow2");
        assertThat(FormatMatrixTest.cli("create", "--dedup", img.toString(), "1M").rc()).isZero();
        byte[] c = new byte[4096];
        try (org.qdedup.image.Qcow2Image q = org.qdedup.image.Images.openWritable(img.toString(),
                org.qdedup.image.OpenOptions.defaults())) {
            for (int i = 0; i < 2; i++) {
                java.util.Arrays.fill(c, (byte) (0x11 + i));
                q.write(java.nio.ByteBuffer.wrap(c), i * 4096L);
            }
        }
        long l2 = u64(img, u64(img, 40)) & L1_OFFSET_MASK;
        long entry = u64(img, l2 + 8);
        put64(img, l2 + 8, (entry & ~L1_OFFSET_MASK) | (0xfff0_0000L << 12)); // guest cluster 1 at 16 TiB
        try (org.qdedup.image.Qcow2Image q = org.qdedup.image.Images.openWritable(img.toString(),
                org.qdedup.image.OpenOptions.defaults())) {
            java.util.Arrays.fill(c, (byte) 0x11);
            q.write(java.nio.ByteBuffer.wrap(c), 8192);
            assertThat(q.writer().dedupCounters().hits).as("shares the cluster still in the file").isEqualTo(1);
            assertThat(q.writer().staleDedupEntries()).isZero();
        }
    }

    /** Found by ImageFuzzTest (qemu-img refused, we read): feature bits QEMU refuses together are refused here too. */
    @Test
    void featureBitsQemuRefuses() throws Exception {
        Path raw = base("dfraw.qcow2");
        put64(raw, 88, u64(raw, 88) | 2); // data-file-raw without a data file
        expectOpenError(raw, "data-file-raw", "offset 88", "found 0x2");
        Path comp = base("compbit.qcow2");
        put64(comp, 72, u64(comp, 72) | 8); // compression type bit with compression type zlib
        expectOpenError(comp, "compression type bit", "offset 72", "found 0x8");
    }

    /**
     * Found by ImageFuzzTest (qemu-img read it, we refused): a bad refcount table entry stopped convert and map, whose
     * preallocation heuristic reads refcounts; as in QEMU it now only means "not preallocated", and check reports it.
     */
    @Test
    void badRefcountTableEntryDoesNotStopReads() throws Exception {
        Path img = dir.resolve("rtentry.qcow2");
        Qemu.img(dir, "create", "-f", "qcow2", img.toString(), "16M");
        Qemu.io(dir, "qcow2", img.toString(), List.of("write -P 0x11 0 128k", "write -P 0x22 8M 64k"));
        long rt = u64(img, 48);
        put64(img, rt, u64(img, rt) + 4);
        Snap before = Snap.of(img);
        expectConvertAsQemu(img);
        assertThat(runTimed("map", "--output=json", img.toString()).rc).isZero();
        Result check = runTimed("check", img.toString());
        assertThat(check.rc).as("check: %s%s", check.out, check.err).isIn(1, 2);
        before.assertUnchanged(img);
    }

    /** Found by ImageFuzzTest (qemu-img read it, we refused): an empty backing format is none, the backing file is probed. */
    @Test
    void emptyBackingFormatIsProbed() throws Exception {
        Qemu.img(dir, "create", "-f", "qcow2", "fmtbase.qcow2", "1M");
        Qemu.io(dir, "qcow2", "fmtbase.qcow2", List.of("write -P 0x56 0 64k"));
        Qemu.img(dir, "create", "-f", "qcow2", "-b", "fmtbase.qcow2", "-F", "qcow2", "fmt.qcow2");
        Path img = dir.resolve("fmt.qcow2");
        long ext = u32(img, 100);
        assertThat(u32(img, ext)).as("first extension is the backing format").isEqualTo(0xe2792acaL);
        patch(img, ext + 8, new byte[8]); // "qcow2" becomes five NULs: an empty name as QEMU reads it
        expectConvertAsQemu(img);
    }

    /** Found by ImageFuzzTest (a difference from qemu-img): QEMU counts the virtual size in whole 512-byte sectors. */
    @Test
    void sizeFieldNotAMultipleOf512ReadsAsWholeSectors() throws Exception {
        Path img = dir.resolve("oddsize.qcow2");
        Qemu.img(dir, "create", "-f", "qcow2", img.toString(), "12M");
        Qemu.io(dir, "qcow2", img.toString(), List.of("write -P 0x61 0 12M"));
        for (long size : new long[]{(12L << 20) - 1, (8L << 20) + 1}) {
            put64(img, 24, size);
            Result info = runTimed("info", "--output=json", img.toString());
            assertThat(((Number) ((java.util.Map<?, ?>) Json.parse(info.out)).get("virtual-size")).longValue()).isEqualTo(size & ~511L);
            expectConvertAsQemu(img);
        }
    }

    /** Found by ImageFuzzTest: a newline in a name quoted from the image (here the backing format) split the error line. */
    @Test
    void controlCharactersInQuotedNamesStayOnOneLine() throws Exception {
        Qemu.img(dir, "create", "-f", "qcow2", "nlbase.qcow2", "1M");
        Qemu.img(dir, "create", "-f", "qcow2", "-b", "nlbase.qcow2", "-F", "qcow2", "nl.qcow2");
        Path img = dir.resolve("nl.qcow2");
        keepTwin(img);
        long ext = u32(img, 100);
        assertThat(u32(img, ext)).as("first extension is the backing format").isEqualTo(0xe2792acaL);
        patch(img, ext + 8, "q\ncow".getBytes(StandardCharsets.ISO_8859_1));
        expectOpenError(img, "backing file format 'q\\x0acow'");
    }

    /**
     * Found by ImageFuzzTest: the repair at the read-write open of a dirty image failed with a bare "File too large"
     * (an L2 entry 32 PiB past the end: the repair extends the file to cover it); it now says the repair failed.
     */
    @Test
    void failedRepairAtOpenSaysSo() throws Exception {
        Path img = dir.resolve("dirtyfar.qcow2");
        Qemu.img(dir, "create", "-f", "qcow2", "-o", "lazy_refcounts=on", img.toString(), "1M");
        Qemu.io(dir, "qcow2", img.toString(), List.of("write -P 0x11 0 64k"));
        put64(img, 72, u64(img, 72) | 1); // dirty
        long l2 = u64(img, u64(img, 40)) & L1_OFFSET_MASK;
        put64(img, l2, (1L << 63) | (1L << 55)); // guest cluster 0 at 32 PiB
        org.assertj.core.api.Assertions.assertThatThrownBy(
                        () -> org.qdedup.image.Images.openWritable(img.toString(), org.qdedup.image.OpenOptions.defaults()).close())
                .isInstanceOf(org.qdedup.format.FormatException.class).hasMessageContaining("its repair failed")
                .hasMessageContaining("check -r all");
    }

    @Test
    void backingLoop() throws Exception {
        Path a = dir.resolve("a.qcow2");
        Path b = dir.resolve("b.qcow2");
        Qemu.img(dir, "create", "-f", "qcow2", "a.qcow2", "1M");
        Qemu.io(dir, "qcow2", "a.qcow2", List.of("write -P 0x55 0 64k"));
        Qemu.img(dir, "create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2");
        Qemu.img(dir, "rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2");
        Snap sb = Snap.of(b);
        // The loop closes when a.qcow2's name comes round again as b.qcow2's backing file.
        String top = a.toString();
        List<String[]> cmds = List.of(
                new String[]{"info", top},
                new String[]{"info", "--backing-chain", "--output=json", top},
                new String[]{"map", "--output=json", top},
                new String[]{"convert", "-O", "raw", top, out()},
                new String[]{"compare", top, good()});
        for (String[] c : cmds) {
            expectError(a, top, c, "loop");
        }
        sb.assertUnchanged(b);
        // Opening from the other end finds the same loop.
        Snap sa = Snap.of(a);
        expectError(b, b.toString(), new String[]{"info", b.toString()}, "loop");
        sa.assertUnchanged(a);
        // An image that is its own backing file.
        Path self = dir.resolve("self.qcow2");
        Qemu.img(dir, "create", "-f", "qcow2", "self.qcow2", "1M");
        Qemu.img(dir, "rebase", "-u", "-b", "self.qcow2", "-F", "qcow2", "self.qcow2");
        expectError(self, self.toString(), new String[]{"info", self.toString()}, "loop");
        expectError(self, self.toString(), new String[]{"map", "--output=json", self.toString()}, "loop");
    }

    @Test
    void backingChainDeeperThan64() throws Exception {
        int n = 66;
        Qemu.img(dir, "create", "-f", "qcow2", "c0.qcow2", "1M");
        for (int i = 1; i < n; i++) {
            Qemu.img(dir, "create", "-f", "qcow2", "-u", "-b", "c" + (i - 1) + ".qcow2", "-F", "qcow2",
                    "c" + i + ".qcow2", "1M");
        }
        // 64 images are fine.
        Path ok = dir.resolve("c63.qcow2");
        Result r = runTimed("info", "--backing-chain", "--output=json", ok.toString());
        assertThat(r.rc).as("info on a chain of 64 images: %s", r.err).isZero();
        Path top = dir.resolve("c" + (n - 1) + ".qcow2");
        List<Snap> all = new ArrayList<>();
        for (int i = 0; i < n; i++) {
            all.add(Snap.of(dir.resolve("c" + i + ".qcow2")));
        }
        List<String[]> cmds = List.of(
                new String[]{"info", top.toString()},
                new String[]{"info", "--backing-chain", top.toString()},
                new String[]{"map", "--output=json", top.toString()},
                new String[]{"convert", "-O", "raw", top.toString(), out()},
                new String[]{"compare", top.toString(), good()});
        for (String[] c : cmds) {
            expectError(top, null, c, "backing chain", "64");
        }
        for (int i = 0; i < n; i++) {
            all.get(i).assertUnchanged(dir.resolve("c" + i + ".qcow2"));
        }
    }

    @Test
    void unknownIncompatibleFeatureBit() throws Exception {
        Path img = base("feat.qcow2");
        put64(img, 72, u64(img, 72) | (1L << 5));
        expectOpenError(img, "bit 5", "incompatible", "offset 72");

        // Same bit, now with a feature name table row for it: the name must appear.
        Path named = base("featname.qcow2");
        put64(named, 72, u64(named, 72) | (1L << 5));
        long hdrLen = u32(named, 100);
        assertThat(u32(named, hdrLen)).as("first extension is the feature name table").isEqualTo(0x6803f857L);
        long len = u32(named, hdrLen + 4);
        assertThat(len % 48).isZero();
        byte[] row = new byte[48];
        row[0] = 0; // incompatible
        row[1] = 5;
        byte[] name = "qdedup-test-frobnication".getBytes(StandardCharsets.US_ASCII);
        System.arraycopy(name, 0, row, 2, name.length);
        patch(named, hdrLen + 8 + len - 48, row); // replaces the last row
        expectOpenError(named, "bit 5", "qdedup-test-frobnication", "offset 72");
    }

    @Test
    void encryptedImage() throws Exception {
        Path img = dir.resolve("enc.qcow2");
        // qemu-img times its key derivation and gives up ("Unable to get accurate CPU usage") on a loaded machine.
        Qemu.Result made = null;
        for (int attempt = 0; attempt < 10; attempt++) {
            made = Qemu.imgRaw(dir, "create", "-f", "qcow2", "--object", "secret,id=sec0,data=abc",
                    "-o", "encrypt.format=luks,encrypt.key-secret=sec0", img.toString(), "1M");
            if (made.exit() == 0 || !made.err().contains("accurate CPU usage")) {
                break;
            }
            Thread.sleep(200);
        }
        made.ok();
        expectOpenError(img, "encrypt", "not supported");
    }

    // ---------------------------------------------------------------- expectations

    /** Bad header or table found at open: every command fails the same way. */
    private void expectOpenError(Path img, String... mustContain) throws Exception {
        String f = img.toString();
        List<String[]> cmds = List.of(
                new String[]{"info", f},
                new String[]{"info", "--output=json", f},
                new String[]{"map", "--output=json", f},
                new String[]{"convert", "-O", "raw", f, out()},
                new String[]{"compare", f, twin(img)},
                new String[]{"compare", twin(img), f});
        for (String[] c : cmds) {
            expectError(img, f, c, mustContain);
        }
    }

    /** Bad data found only when a table or cluster is read: map (if {@code map}), convert and compare fail. */
    private void expectReadError(Path img, boolean map, String... mustContain) throws Exception {
        String f = img.toString();
        List<String[]> cmds = new ArrayList<>();
        if (map) {
            cmds.add(new String[]{"map", "--output=json", f});
            cmds.add(new String[]{"map", f});
        }
        cmds.add(new String[]{"convert", "-O", "raw", f, out()});
        cmds.add(new String[]{"compare", f, twin(img)});
        cmds.add(new String[]{"compare", "-s", twin(img), f});
        for (String[] c : cmds) {
            expectError(img, f, c, mustContain);
        }
    }

    /** Not bad input after all: convert -O raw succeeds and gives what qemu-img's gives. */
    private void expectConvertAsQemu(Path img) throws IOException {
        Result conv = runTimed("convert", "-O", "raw", img.toString(), out());
        assertThat(conv.rc).as("convert: %s", conv.err).isZero();
        Qemu.img(dir, "convert", "-O", "raw", img.toString(), dir.resolve("qemu.raw").toString());
        assertThat(Files.readAllBytes(Path.of(out()))).as("convert as qemu-img's").isEqualTo(Files.readAllBytes(dir.resolve("qemu.raw")));
    }

    /** info reads no L2 table: it may succeed (as qemu-img does) but must not crash or change the image. */
    private void expectInfoTolerates(Path img) throws Exception {
        Snap before = Snap.of(img);
        Result r = runTimed("info", "--output=json", img.toString());
        if (r.rc != 0) {
            assertOneLine(r, img.toString(), 1);
        } else {
            assertThat(r.err).isEmpty();
        }
        before.assertUnchanged(img);
    }

    /**
     * Runs one command on a bad image: exit 1 (2 for compare), one stderr line naming {@code fileNamed} (null: any
     * file, the message must then contain the words given), no stdout, image untouched.
     */
    private void expectError(Path img, String fileNamed, String[] args, String... mustContain) throws Exception {
        Snap before = Snap.of(img);
        Result r = runTimed(args);
        int expectRc = args[0].equals("compare") ? 2 : 1;
        String what = String.join(" ", args);
        assertOneLine(r, fileNamed, expectRc);
        for (String s : mustContain) {
            assertThat(r.err).as("%s: stderr names %s", what, s).contains(s);
        }
        before.assertUnchanged(img);
        Files.deleteIfExists(Path.of(out()));
    }

    private static void assertOneLine(Result r, String fileNamed, int expectRc) {
        String what = String.join(" ", r.args);
        assertThat(r.rc).as("%s: exit code (stderr: %s)", what, r.err).isEqualTo(expectRc);
        assertThat(r.out).as("%s: stdout", what).isEmpty();
        assertThat(r.err).as("%s: stderr is one line", what).endsWith("\n");
        assertThat(r.err.indexOf('\n')).as("%s: stderr is one line: %s", what, r.err).isEqualTo(r.err.length() - 1);
        assertThat(r.err).as("%s: stderr", what).startsWith("qdedup: ")
                .doesNotContain("Exception").doesNotContain("at org.").doesNotContain("\tat ")
                .doesNotContain("internal error");
        if (fileNamed != null) {
            assertThat(r.err).as("%s: stderr names the file", what).startsWith("qdedup: " + fileNamed + ": ");
        }
    }

    // ---------------------------------------------------------------- running

    private record Result(String[] args, int rc, String out, String err) {
    }

    private static Result runTimed(String... args) {
        return assertTimeoutPreemptively(LIMIT, () -> {
            ByteArrayOutputStream out = new ByteArrayOutputStream();
            ByteArrayOutputStream err = new ByteArrayOutputStream();
            int rc;
            try (PrintStream o = new PrintStream(out, true, StandardCharsets.UTF_8);
                 PrintStream e = new PrintStream(err, true, StandardCharsets.UTF_8)) {
                rc = Main.run(args, o, e);
            }
            Result r = new Result(args, rc, out.toString(StandardCharsets.UTF_8), err.toString(StandardCharsets.UTF_8));
            if (VERBOSE) {
                System.out.println("[bad-input] " + String.join(" ", args) + " -> " + rc + ": " + r.err.strip());
            }
            return r;
        }, () -> String.join(" ", args) + " did not finish within " + LIMIT.toSeconds() + " s");
    }

    private String out() {
        return dir.resolve("out.raw").toString();
    }

    /** A valid, empty image of the base size, the other side of compare when the content does not matter. */
    private String good() {
        Path g = dir.resolve("good.qcow2");
        if (!Files.exists(g)) {
            Qemu.img(dir, "create", "-f", "qcow2", g.toString(), "4G");
        }
        return g.toString();
    }

    /**
     * The other side of compare for {@code img}: its copy from before the damage (same guest content, so compare has
     * to read up to the damage), else an empty image.
     */
    private String twin(Path img) {
        Path t = dir.resolve(img.getFileName() + ".orig");
        return Files.exists(t) ? t.toString() : good();
    }

    /** Keeps a copy of a valid image before it is damaged, for {@link #twin}. */
    private Path keepTwin(Path img) throws IOException {
        Files.copy(img, dir.resolve(img.getFileName() + ".orig"));
        return img;
    }

    // ---------------------------------------------------------------- images

    /** 4 GiB (L1 of 8 entries), 64 KiB clusters, data at 0 (128 KiB) and at 1 GiB (a second L2 table). */
    private Path base(String name) throws IOException {
        Path p = dir.resolve(name);
        Qemu.img(dir, "create", "-f", "qcow2", p.toString(), "4G");
        Qemu.io(dir, "qcow2", p.toString(), List.of("write -P 0x11 0 128k", "write -P 0x22 1G 64k"));
        return keepTwin(p);
    }

    private Path withSnapshot(String name) throws IOException {
        Path p = base(name);
        Qemu.img(dir, "snapshot", "-c", "s1", p.toString());
        Qemu.io(dir, "qcow2", p.toString(), List.of("write -P 0x33 64k 64k"));
        assertThat(u32(p, 60)).isEqualTo(1);
        Files.delete(dir.resolve(name + ".orig"));
        return keepTwin(p);
    }

    private static long u32(Path p, long off) throws IOException {
        byte[] b = read(p, off, 4);
        return ((b[0] & 0xffL) << 24) | ((b[1] & 0xffL) << 16) | ((b[2] & 0xffL) << 8) | (b[3] & 0xffL);
    }

    private static long u16(Path p, long off) throws IOException {
        byte[] b = read(p, off, 2);
        return ((b[0] & 0xffL) << 8) | (b[1] & 0xffL);
    }

    private static long u64(Path p, long off) throws IOException {
        return (u32(p, off) << 32) | u32(p, off + 4);
    }

    private static void put32(Path p, long off, long v) throws IOException {
        patch(p, off, new byte[]{(byte) (v >>> 24), (byte) (v >>> 16), (byte) (v >>> 8), (byte) v});
    }

    private static void put64(Path p, long off, long v) throws IOException {
        put32(p, off, v >>> 32);
        put32(p, off + 4, v & 0xffff_ffffL);
    }

    private static byte[] read(Path p, long off, int n) throws IOException {
        try (RandomAccessFile f = new RandomAccessFile(p.toFile(), "r")) {
            byte[] b = new byte[n];
            f.seek(off);
            f.readFully(b);
            return b;
        }
    }

    private static void patch(Path p, long off, byte[] bytes) throws IOException {
        try (RandomAccessFile f = new RandomAccessFile(p.toFile(), "rw")) {
            f.seek(off);
            f.write(bytes);
        }
    }

    private static void truncate(Path p, long size) throws IOException {
        try (RandomAccessFile f = new RandomAccessFile(p.toFile(), "rw")) {
            f.setLength(size);
        }
    }

    private static long roundUp(long v, long to) {
        return (v + to - 1) / to * to;
    }

    /** Content hash and mtime of a file, to prove a failed command left it alone. */
    private record Snap(String sha256, FileTime mtime, long size) {
        static Snap of(Path p) throws Exception {
            MessageDigest md = MessageDigest.getInstance("SHA-256");
            long size = 0;
            try (InputStream in = Files.newInputStream(p)) {
                byte[] buf = new byte[1 << 20];
                for (int n; (n = in.read(buf)) > 0; ) {
                    md.update(buf, 0, n);
                    size += n;
                }
            }
            return new Snap(HexFormat.of().formatHex(md.digest()), Files.getLastModifiedTime(p), size);
        }

        void assertUnchanged(Path p) throws Exception {
            Snap now = of(p);
            assertThat(now).as("%s unchanged (bytes and mtime)", p).isEqualTo(this);
        }
    }
}
