/* bench-free-port: prints a TCP port on 127.0.0.1 that was free a moment
 * ago (the kernel's choice for port 0), for servers such as gnutls-serv
 * that need a fixed --port.  Another process may take it before it is
 * used; callers retry on "address in use". */
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(void)
{
        struct sockaddr_in a;
        socklen_t len = sizeof(a);
        int fd = socket(AF_INET, SOCK_STREAM, 0);

        memset(&a, 0, sizeof(a));
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 ||
            getsockname(fd, (struct sockaddr *)&a, &len) < 0) {
                perror("bench-free-port");
                return 1;
        }
        printf("%u\n", ntohs(a.sin_port));
        close(fd);
        return 0;
}
