package org.qdedup;

import static org.assertj.core.api.Assertions.assertThat;

import java.net.StandardProtocolFamily;
import java.net.UnixDomainSocketAddress;
import java.nio.ByteBuffer;
import java.nio.channels.ServerSocketChannel;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.EnumSet;
import java.util.List;
import java.util.Random;
import org.junit.jupiter.api.Assumptions;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.Timeout;
import org.junit.jupiter.api.io.TempDir;
import org.qdedup.image.CreateOptions;
import org.qdedup.image.Images;
import org.qdedup.image.OpenOptions;
import org.qdedup.image.Qcow2Create;
import org.qdedup.image.Qcow2Image;
import org.qdedup.io.FaultyFile;
import org.qdedup.io.FaultyFile.Errno;
import org.qdedup.io.FaultyFile.Op;
import org.qdedup.io.MemoryBlockFile;
import org.qdedup.nbd.NbdServer;

/**
 * A full disk and I/O errors seen by NBD clients: NBD_ENOSPC and NBD_EIO in the replies, the server goes on, and
 * a real full file system (a small tmpfs) filled through `serve --dedup` works again once space is freed.
 */
class FullDiskTest {
    @TempDir
    Path dir;

    static final int NBD_EIO = 5, NBD_ENOSPC = 28;
    static final int WRITE = 1, FLUSH = 3;

    @Test
    @Timeout(120)
    void nbdRepliesEnospcAndEioAndKeepsServing() throws Exception {
        MemoryBlockFile m = new MemoryBlockFile("m.qcow2", new byte[0]);
        Qcow2Create.write(m, CreateOptions.defaults(8L << 20).withClusterBits(12));
        FaultyFile ff = new FaultyFile(m);
        Path sock = dir.resolve("e.sock");
        byte[] data = new byte[65536];
        new Random(3).nextBytes(data);
        try (Qcow2Image img = Images.openWritable(ff)) {
            ServerSocketChannel l = ServerSocketChannel.open(StandardProtocolFamily.UNIX);
            l.bind(UnixDomainSocketAddress.of(sock));
            NbdServer server = new NbdServer(img, false, "", 0, l);
            Thread serving = Thread.ofPlatform().start(() -> {
                try {
                    server.serve();
                } catch (Exception e) {
                    throw new RuntimeException(e);
                }
            });
            try (NbdServeTest.RawClient c = new NbdServeTest.RawClient(sock)) {
                ff.failAt(1, Errno.ENOSPC, true, EnumSet.of(Op.WRITE, Op.TRUNCATE));
                c.request(WRITE, 0, data.length, data);
                assertThat(c.replyError()).as("write on a full disk").isEqualTo(NBD_ENOSPC);
                c.request(WRITE, 1 << 20, data.length, data);
                assertThat(c.replyError()).as("still full").isEqualTo(NBD_ENOSPC);
                ff.lift();
                c.request(WRITE, 0, data.length, data);
                assertThat(c.replyError()).as("write once space is back").isZero();
                c.request(FLUSH, 0, 0, null);
                assertThat(c.replyError()).isZero();
                // A transient EIO on a data write: that request fails, the next one works.
                ff.failAt(1, Errno.EIO, false, EnumSet.of(Op.WRITE));
                c.request(WRITE, 2 << 20, data.length, data);
                assertThat(c.replyError()).as("write meeting EIO").isEqualTo(NBD_EIO);
                c.request(WRITE, 2 << 20, data.length, data);
                assertThat(c.replyError()).as("the next write").isZero();
                // ENOSPC while a flush writes metadata: NBD_ENOSPC, and the flush works once space is back.
                ff.failAt(1, Errno.ENOSPC, true, EnumSet.of(Op.WRITE, Op.TRUNCATE));
                c.request(FLUSH, 0, 0, null);
                assertThat(c.replyError()).as("flush writing L2 tables on a full disk").isEqualTo(NBD_ENOSPC);
                ff.lift();
                c.request(FLUSH, 0, 0, null);
                assertThat(c.replyError()).as("flush once space is back").isZero();
                // A failed fsync: EIO, and every later write is refused (EIO, never ENOSPC); reads go on.
                c.request(WRITE, 3 << 20, data.length, data);
                assertThat(c.replyError()).isZero();
                ff.failAt(1, Errno.ENOSPC, false, EnumSet.of(Op.FLUSH));
                c.request(FLUSH, 0, 0, null);
                assertThat(c.replyError()).as("failed fsync").isEqualTo(NBD_ENOSPC);
                c.request(WRITE, 4 << 20, data.length, data);
                assertThat(c.replyError()).as("write after a failed fsync").isEqualTo(NBD_EIO);
                c.request(FLUSH, 0, 0, null);
                assertThat(c.replyError()).as("flush after a failed fsync").isEqualTo(NBD_EIO);
                c.request(0, 0, data.length, null);
                assertThat(c.replyError()).as("read after a failed fsync").isZero();
                assertThat(c.read(data.length).array()).isEqualTo(data);
            }
            server.close();
            serving.join(30_000);
            assertThat(serving.isAlive()).isFalse();
        }
    }

    @Test
    @Timeout(300)
    void aFullTmpfsGivesTheClientEnospcAndTheImageWorksOnceSpaceIsFreed() throws Exception {
        Path mnt = dir.resolve("mnt");
        Files.createDirectories(mnt);
        Qemu.Result mount = Qemu.exec(dir, List.of("mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", mnt.toString()));
        Assumptions.assumeTrue(mount.exit() == 0, "cannot mount a tmpfs here (needs root): " + mount.err().strip()
                + "; the fault layer (FaultTest) covers full disks instead");
        try {
            String img = mnt.resolve("d.qcow2").toString();
            assertThat(FormatMatrixTest.cli("create", "--dedup", img, "64M").rc()).isZero();
            // 40 MiB of filler leaves about 8 MiB for the image
            Path filler = mnt.resolve("filler");
            byte[] mib = new byte[1 << 20];
            new Random(1).nextBytes(mib);
            try (var out = Files.newOutputStream(filler)) {
                for (int i = 0; i < 40; i++) {
                    out.write(mib);
                }
            }
            // 24 MiB of distinct data (16 MiB of it random, then the same 8 MiB again): more than the space left
            byte[] disk = new byte[24 << 20];
            Random r = new Random(2);
            byte[] part = new byte[16 << 20];
            r.nextBytes(part);
            System.arraycopy(part, 0, disk, 0, part.length);
            System.arraycopy(part, 0, disk, 16 << 20, 8 << 20);
            Path src = dir.resolve("src.raw");
            Files.write(src, disk);
            try (ServeProcess s = new ServeProcess(dir, "--socket", dir.resolve("t.sock").toString(), img)) {
                Qemu.Result full = Qemu.exec(dir, List.of("nbdcopy", src.toString(), s.uri));
                assertThat(full.exit()).as("nbdcopy onto a full disk fails").isNotZero();
                assertThat(full.err()).as("the client is told ENOSPC").contains("No space left on device");
                // the server still answers, and what it has is readable
                Qemu.exec(dir, List.of("qemu-io", "-f", "raw", "-c", "read 0 1M", s.uri)).ok();
                Files.delete(filler);
                Qemu.exec(dir, List.of("nbdcopy", src.toString(), s.uri)).ok();
                Qemu.exec(dir, List.of("qemu-img", "compare", "-f", "raw", "-F", "raw", src.toString(), s.uri)).ok();
                assertThat(s.stop()).as("serve exits 0 after SIGTERM").isZero();
            }
            FormatMatrixTest.assertClean(dir, img);
            Qemu.exec(dir, List.of("qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, src.toString())).ok();
            assertThat(Qemu.hostClusters(dir, img, 4096)).as("16 MiB distinct stored once").isEqualTo(4096);
            try (Qcow2Image q = Images.openWritable(img, OpenOptions.defaults())) {
                assertThat(q.writer().staleDedupEntries()).isZero();
            }
        } finally {
            Qemu.exec(dir, List.of("umount", mnt.toString()));
        }
    }
}
